"""tinyrl: Memory-R+ reinforcement learning for small language models on one small GPU.

From Python, as the CLI does (the same run folder, resume and faults):

    import tinyrl
    run = tinyrl.fit("custom", train=rows, rewards=[my_reward], method="memory-r+", success="my_reward>=1",
                     model="smollm2-135m", out="runs/mine", steps=20)

`train` / `test`: a path, hub name, `datasets.Dataset` or list of dicts (see tinyrl.tasks.rows); `rewards`: functions
with TRL's contract (tinyrl.task); every other keyword is a setting (`tinyrl settings`).
"""

__version__ = "0.1.0"


def fit(task: str = "custom", train=None, test=None, rewards=(), resume: bool = False, quiet: bool = False,
        **settings) -> str:
    """Train (or resume: rerunning the same call continues a stopped run) and return the run folder."""
    import dataclasses

    from tinyrl import config, loop

    unknown = sorted(set(settings) - set(config.FIELDS))
    if unknown:
        raise config.UserError(f"tinyrl.fit: no setting {unknown[0]!r}; `tinyrl settings` lists them")
    path = isinstance(train, str) and train
    cfg = config.validate(dataclasses.replace(config.for_task(task), **settings, **({"data": path} if path else {})))
    data = None if path else train
    return loop.fit(cfg, quiet=quiet, pins=frozenset(settings), resume=resume, data=data, test_data=test,
                    reward_funcs=tuple(rewards))
