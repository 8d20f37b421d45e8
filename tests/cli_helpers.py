"""Shared by the CLI tests: what a one-line user error looks like."""


def one_line_error(res, code=None):
    """``res`` (a click ``Result``) failed with exactly one ``error:`` line and no traceback; returns that line."""
    assert res.exit_code != 0, res.output
    if code is not None:
        assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    errs = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errs) == 1, res.output
    return errs[0]
