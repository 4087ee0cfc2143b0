"""The `cosmic` dispatcher reports bad input in one line naming the path, with exit status 2."""

from cosmic_jax.cli import main


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    rc = main(["embed", "--checkpoint", str(missing), "--input", str(tmp_path), "--output", str(tmp_path / "e.npy")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("cosmic embed: error: ") and str(missing) in err and "\n" not in err


def test_bad_extrapolation_share_is_refused_before_any_work(tmp_path, capsys):
    work = tmp_path / "w"
    rc = main(["analyze", "--data", str(tmp_path), "--workdir", str(work), "--quick",
               "--config.extrapolate_fraction=1.0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "extrapolate_fraction=1.0" in err and "\n" not in err
    assert not work.exists()  # refused before the workdir, pretraining or embedding
