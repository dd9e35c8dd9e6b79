"""The README's first-study commands work as pasted, in the shell the Quick start leaves: the
project's venv active, whose bin/ holds pynetdicom's own storescu, findscu and echoscu."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

from tests import REPO

README = REPO / "README.md"
SECTION = "## Send a first study and find it"
DEFAULT_DIMSE_PORT = "11112"


def first_study_commands() -> str:
    """The first bash block of the README's first-study section, as written."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(SECTION):]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match, "no bash block in the first-study section"
    return match.group(1)


def test_first_study_commands_run_as_pasted(make_archive, corpus, tmp_path):
    archive = make_archive("readme")
    series = corpus.study(corpus.patient(), dt.date(2023, 3, 14), slices=3)
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "storescu").exists()  # the pynetdicom script that shadows DCMTK's
    script = first_study_commands()
    assert script.count(DEFAULT_DIMSE_PORT) == 3 and "path/to/ct-series/" in script
    # this test's archive listens on a free port; the folder is the newcomer's
    script = script.replace(DEFAULT_DIMSE_PORT, str(archive.dimse_port)).replace(
        "path/to/ct-series/", f"{series[0].parent}/")
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"  # . .venv/bin/activate
    env["VIRTUAL_ENV"] = str(venv_bin.parent)
    result = subprocess.run(["bash", "-e", "-c", script], env=env, capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage" not in (result.stdout + result.stderr).lower()
    [study] = archive.client().search_for_studies()
    assert study["00201208"]["Value"] == [len(series)]
    pseudonym = study["00100020"]["Value"][0]
    assert re.fullmatch(r"[1-9][0-9]{5}-[0-9]{6}", pseudonym)
    assert pseudonym in result.stdout + result.stderr  # findscu printed the study it found
