"""The `cosmic` dispatcher reports bad input in one line naming the path, with exit status 2."""

import pytest

from cosmic_jax.cli import main


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    rc = main(["embed", "--checkpoint", str(missing), "--input", str(tmp_path), "--output", str(tmp_path / "e.npy")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("cosmic embed: error: ") and str(missing) in err and "\n" not in err


@pytest.mark.parametrize("setting", ["extrapolate_fraction=1.0", "extrapolate_band_rate=0.0", "orient_fill=3.0"])
def test_bad_analysis_setting_is_refused_before_any_work(tmp_path, capsys, setting):
    work = tmp_path / "w"
    rc = main(["analyze", "--data", str(tmp_path), "--workdir", str(work), "--quick", f"--config.{setting}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and setting in err and "\n" not in err
    assert not work.exists()  # refused before the workdir, pretraining or embedding
