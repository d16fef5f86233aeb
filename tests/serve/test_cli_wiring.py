"""`lorakit serve` and `lorakit export` reach the serving module's own parsers."""
import pytest

from lorakit.cli import main


@pytest.mark.parametrize("cmd", ["serve", "export"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()
