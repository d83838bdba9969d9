"""The shipped digits recipes reach 95% validation top-1 on this kind of 2-core CPU machine.

Slow (about 90 s each here): run with ``python -m pytest -m slow``.
"""

import pytest

from trainers.checkpoint import load_checkpoint
from trainers.config import load_train_config
from trainers.driver import fit


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["digits_linear", "digits_text"])
def test_digits_recipe_reaches_95_percent(ray_local, tmp_path, recipe):
    result = fit(load_train_config(recipe, [f"output={tmp_path}"]))
    assert result.metrics["val_top1"] >= 0.95
    model, cfg = load_checkpoint(result.checkpoint.path)
    assert cfg.head == ("text" if recipe == "digits_text" else "linear") and not model.training
