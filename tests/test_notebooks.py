"""The notebooks in recipes/ run top to bottom (nbclient), as a Colab or Kaggle user runs them, with the parameters
cell switched to the offline model, the local GSM8K and 2 steps; a notebook that stops working fails here."""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "recipes", "*.ipynb")))


def test_there_are_the_two_notebooks():
    assert [os.path.basename(p) for p in NOTEBOOKS] == ["colab_t4.ipynb", "kaggle.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom_on_cpu(path, gsm8k_dir, tmp_path):
    nb = nbformat.read(path, as_version=4)
    [at] = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    out = str(tmp_path / "run")
    ci = (f"MODEL = 'smollm2-135m'\nDATA = {gsm8k_dir!r}\nOUT = {out!r}\nSTEPS = 2\nSAVE_EVERY = 1\n"
          "EVAL_LIMIT = 2\nSETS = ['prompts_per_step=2', 'group_size=2', 'max_new_tokens=16', 'threads=2']\n"
          "INSTALL = False")
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(ci, metadata={"tags": ["injected-parameters"]}))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "planned within" in text and "= generation" in text  # tinyrl plan's table
    assert "step 2/2" in text and "best step" in text and "last step 2" in text
    assert os.path.exists(os.path.join(out, "checkpoints", "step-000002"))
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    if pytest.importorskip("matplotlib"):
        assert len(images) >= 3  # the report's plots, inline
