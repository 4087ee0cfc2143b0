"""The `cosmic` dispatcher reports bad input in one line naming the path, with exit status 2."""

from cosmic_jax.cli import main


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    rc = main(["embed", "--checkpoint", str(missing), "--input", str(tmp_path), "--output", str(tmp_path / "e.npy")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("cosmic embed: error: ") and str(missing) in err and "\n" not in err
