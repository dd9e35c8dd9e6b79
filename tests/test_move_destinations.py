"""C-MOVE destinations in the configuration: global and per site, validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from ricord_archive.config import ConfigError, MoveDestination, load_config
from tests import REPO

EXAMPLE = REPO / "conf" / "ricord-archive.toml"
SITES_AND_DESTINATIONS = """
[[sites]]
name = "a"
aets = ["PACS_A"]
[[sites.move_destinations]]
aet = "WS_A"
host = "10.0.0.21"
port = 11113
[[sites.move_destinations]]
aet = "SHARED"
host = "10.0.0.22"
port = 104

[[sites]]
name = "b"
aets = ["PACS_B"]

[[move_destinations]]
aet = "SHARED"
host = "viewer.example.org"
port = 11112
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path, env={})


def test_destinations_per_site_first_then_global(tmp_path):
    config = load(tmp_path, SITES_AND_DESTINATIONS)
    assert config.move_destination("WS_A", "PACS_A") == MoveDestination("WS_A", "10.0.0.21", 11113)
    assert config.move_destination("WS_A", "PACS_B") is None  # another site's destination
    assert config.move_destination("SHARED", "PACS_A").host == "10.0.0.22"  # its own first
    assert config.move_destination("SHARED", "PACS_B").host == "viewer.example.org"
    assert config.move_destination("SHARED", "STRANGER").port == 11112
    assert config.move_destination("NOWHERE", "PACS_A") is None


def test_no_destinations_by_default(tmp_path):
    config = load(tmp_path, "")
    assert config.move_destinations == ()
    assert config.move_destination("ANY", "ANY") is None


def test_the_example_configuration_has_a_destination():
    config = load_config(EXAMPLE, env={})
    assert config.move_destination("WORKSTATION", "PACS_A") == MoveDestination(
        "WORKSTATION", "127.0.0.1", 11113)


@pytest.mark.parametrize(("entry", "message"), [
    ('aet = "A"\nhost = "h"', "needs a port"),
    ('aet = "A"\nhost = "h"\nport = 0', "needs a port"),
    ('aet = "A"\nhost = "h"\nport = 70000', "needs a port"),
    ('aet = "A"\nhost = "h"\nport = true', "needs a port"),
    ('aet = "A"\nhost = "h"\nport = "104"', "needs a port"),
    ('aet = "A"\nport = 104', "needs a host"),
    ('aet = "A"\nhost = "two words"\nport = 104', "needs a host"),
    ('host = "h"\nport = 104', "aet must be an AE title"),
    ('aet = "A_TITLE_LONGER_THAN_16"\nhost = "h"\nport = 104', "aet must be an AE title"),
    ('aet = " A"\nhost = "h"\nport = 104', "aet must be an AE title"),
    ('aet = "A"\nhost = "h"\nport = 104\ncalling = "X"',
     r"move destination: unknown setting\(s\) calling"),
])
def test_bad_destinations_rejected(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, f"[[move_destinations]]\n{entry}\n")
    with pytest.raises(ConfigError, match=f"site 'a': .*{message}"):
        load(tmp_path, f'[[sites]]\nname = "a"\n[[sites.move_destinations]]\n{entry}\n')


def test_destination_listed_twice_or_not_a_table_rejected(tmp_path):
    twice = '[[move_destinations]]\naet = "A"\nhost = "h"\nport = 1\n' * 2
    with pytest.raises(ConfigError, match="listed twice"):
        load(tmp_path, twice)
    with pytest.raises(ConfigError, match="must be an array of tables"):
        load(tmp_path, 'move_destinations = "A@h:1"\n')
