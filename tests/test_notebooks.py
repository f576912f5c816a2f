"""The notebooks in recipes/ run top to bottom (nbclient), as a Colab or Kaggle user runs them, with the parameters
cell switched to the offline model, the local GSM8K and 2 steps; a notebook that stops working fails here. The
Kaggle notebook's code is the Colab one's but for its settings cell (checked), so one run covers both."""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "recipes", "*.ipynb")))


def test_there_are_the_two_notebooks():
    assert [os.path.basename(p) for p in NOTEBOOKS] == ["colab_t4.ipynb", "kaggle.ipynb"]


def code_cells(nb) -> list[str]:
    """The code cells but the parameters (settings) cell."""
    return [c.source for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])]


def test_the_notebooks_differ_only_in_their_settings():
    """So running one top to bottom (below) runs the other's code too: every code cell but the settings cell is the
    same, and the settings cells define the same names (run here), each with its platform's run folder."""
    colab, kaggle = (nbformat.read(p, as_version=4) for p in NOTEBOOKS)
    assert code_cells(colab) == code_cells(kaggle) and len(code_cells(colab)) >= 4
    settings = []
    for nb in (colab, kaggle):
        [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        names: dict = {}
        exec(cell.source, names)
        settings.append({k: v for k, v in names.items() if not k.startswith("__")})
    assert settings[0].keys() == settings[1].keys() >= {"MODEL", "DATA", "OUT", "STEPS", "SETS", "INSTALL"}
    assert settings[0]["OUT"].startswith("/content/drive/") and settings[1]["OUT"].startswith("/kaggle/working/")
    assert 0 < settings[0]["MAX_MINUTES"] < 12 * 60 and 0 < settings[1]["MAX_MINUTES"] < 12 * 60


def test_notebook_runs_top_to_bottom_on_cpu(gsm8k_dir, tmp_path):
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)  # the Colab one; the Kaggle one differs only in its settings
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
