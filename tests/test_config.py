"""Unit tests for configuration loading: TOML file, then RICORD_* environment, then overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ricord_archive.config import DEFAULT_SITE_NAME, ConfigError, Limits, load_config

TWO_SITES = """
[[sites]]
name = "alpha"
aets = ["ALPHA_CT", "ALPHA_MR"]
siteid = 123456

[[sites]]
name = "beta"
aets = ["BETA"]
siteid = "654321"
default = true
"""


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None, **overrides):
    path = tmp_path / "ricord-archive.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env=env or {}, overrides=overrides)


def rejected(tmp_path: Path, text: str, match: str | None = None) -> None:
    with pytest.raises(ConfigError, match=match):
        load(tmp_path, text)


def sites_toml(*entries: str) -> str:
    return "".join(f"[[sites]]\n{entry}\n" for entry in entries)


# --- defaults -----------------------------------------------------------------------------------


def test_defaults_have_one_default_site_accepting_any_ae():
    config = load_config(env={})
    assert [s.name for s in config.sites] == [DEFAULT_SITE_NAME]
    assert config.default_site.name == DEFAULT_SITE_NAME
    assert config.accept_any_calling_aet
    assert config.site_for_aet("ANY_SCU") is config.default_site


def test_default_values():
    config = load_config(env={})
    assert config.data_dir == Path("data").resolve()
    assert (config.http_port, config.dimse_port, config.ae_title) == (8042, 11112, "RICORD")
    assert config.database_url is None
    assert config.secret_key is None
    assert config.limits == Limits()


def test_config_is_frozen():
    config = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ae_title = "OTHER"  # type: ignore[misc]


def test_config_path_from_environment(tmp_path):
    path = tmp_path / "conf.toml"
    path.write_text('[server]\nae_title = "FROM_ENV_FILE"\n', encoding="utf-8")
    assert load_config(env={"RICORD_CONFIG": str(path)}).ae_title == "FROM_ENV_FILE"


def test_server_settings_from_file(tmp_path):
    config = load(tmp_path, '[server]\nhttp_port = 9000\ndimse_port = 104\nae_title = "ARCH"\n')
    assert (config.http_port, config.dimse_port, config.ae_title) == (9000, 104, "ARCH")


# --- sites ----------------------------------------------------------------------------------------


def test_sites_are_parsed(tmp_path):
    config = load(tmp_path, TWO_SITES)
    alpha, beta = config.sites
    assert (alpha.name, alpha.aets, alpha.siteid, alpha.default) == (
        "alpha", ("ALPHA_CT", "ALPHA_MR"), "123456", False
    )
    assert (beta.name, beta.aets, beta.siteid, beta.default) == ("beta", ("BETA",), "654321", True)
    assert config.default_site is beta
    assert not config.accept_any_calling_aet


def test_site_for_aet(tmp_path):
    config = load(tmp_path, TWO_SITES)
    assert config.site_for_aet("ALPHA_MR").name == "alpha"
    assert config.site_for_aet("BETA").name == "beta"
    assert config.site_for_aet("STRANGER") is None
    assert config.site_for_aet("alpha_mr") is None  # AE titles are case-sensitive


def test_site_named(tmp_path):
    config = load(tmp_path, TWO_SITES)
    assert config.site_named("alpha").siteid == "123456"
    with pytest.raises(ConfigError):
        config.site_named("gamma")


def test_first_site_becomes_default_when_none_is_flagged(tmp_path):
    config = load(tmp_path, sites_toml('name = "a"', 'name = "b"'))
    assert [s.default for s in config.sites] == [True, False]
    assert config.default_site.name == "a"
    assert config.sites[0].aets == ()
    assert config.sites[0].siteid is None


def test_two_defaults_rejected(tmp_path):
    rejected(tmp_path, sites_toml('name = "a"\ndefault = true', 'name = "b"\ndefault = true'))


@pytest.mark.parametrize(
    "siteid", ['"012345"', '"12345"', '"1234567"', '"abcdef"', '"123456\\n"', "12345.0", "true"]
)
def test_pinned_siteid_must_be_six_digits_not_starting_with_zero(tmp_path, siteid):
    rejected(tmp_path, sites_toml(f'name = "a"\nsiteid = {siteid}'), match="siteid")


def test_duplicate_site_names_rejected(tmp_path):
    rejected(tmp_path, sites_toml('name = "a"', 'name = "a"'), match="unique")


def test_duplicate_aets_rejected(tmp_path):
    text = sites_toml('name = "a"\naets = ["SCU"]', 'name = "b"\naets = ["SCU"]')
    rejected(tmp_path, text, match="one site")


def test_duplicate_pinned_siteids_rejected(tmp_path):
    text = sites_toml('name = "a"\nsiteid = 111111', 'name = "b"\nsiteid = "111111"')
    rejected(tmp_path, text, match="unique")


@pytest.mark.parametrize(
    "aets", ['"SCU"', f'["{"X" * 17}"]', "[1]", '["BAD\\u0001"]', '["SCU\\n"]', '[""]']
)
def test_bad_aets_rejected(tmp_path, aets):
    rejected(tmp_path, sites_toml(f'name = "a"\naets = {aets}'), match="aets")


@pytest.mark.parametrize(
    "text", ["sites = []\n", "sites = [1]\n", 'sites = "a"\n', sites_toml('aets = ["X"]')]
)
def test_malformed_site_lists_rejected(tmp_path, text):
    rejected(tmp_path, text)


# --- environment and overrides ----------------------------------------------------------------


SERVER = """
[server]
data_dir = "/srv/from-file"
database_url = "postgresql://file/db"
secret_key = "file-secret"
"""

ENV = {
    "RICORD_DATA_DIR": "/srv/from-env",
    "RICORD_DATABASE_URL": "postgresql://env/db",
    "RICORD_SECRET_KEY": "env-secret",
}


def test_file_values_without_environment(tmp_path):
    config = load(tmp_path, SERVER)
    assert config.data_dir == Path("/srv/from-file")
    assert config.database_url == "postgresql://file/db"
    assert config.secret_key == "file-secret"


def test_environment_overrides_file(tmp_path):
    config = load(tmp_path, SERVER, env=ENV)
    assert config.data_dir == Path("/srv/from-env")
    assert config.database_url == "postgresql://env/db"
    assert config.secret_key == "env-secret"


def test_empty_environment_variables_are_ignored(tmp_path):
    config = load(tmp_path, SERVER, env=dict.fromkeys(ENV, ""))
    assert config.database_url == "postgresql://file/db"


def test_explicit_overrides_beat_environment(tmp_path):
    config = load(
        tmp_path, SERVER, env=ENV, data_dir=Path("/srv/from-flag"),
        database_url="postgresql://flag/db", http_port=1234, ae_title=None,
    )
    assert config.data_dir == Path("/srv/from-flag")
    assert config.database_url == "postgresql://flag/db"
    assert config.secret_key == "env-secret"
    assert config.http_port == 1234
    assert config.ae_title == "RICORD"  # None means "not given"


def test_relative_data_dir_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(env={"RICORD_DATA_DIR": "store"}).data_dir == tmp_path / "store"


# --- limits and other validation --------------------------------------------------------------


def test_limits_from_file(tmp_path):
    limits = load(tmp_path, "[limits]\nqido_max_limit = 50\nmax_object_bytes = 1048576\n").limits
    assert limits == Limits(max_object_bytes=1048576, qido_max_limit=50)


def test_unknown_limit_is_a_config_error(tmp_path):
    rejected(tmp_path, "[limits]\nmax_objekt_bytes = 10\n", match="max_objekt_bytes")


@pytest.mark.parametrize(("text", "where", "key"), [
    ("[server]\nhttp_prot = 9000\n", "[server]", "http_prot"),
    ("[ingest]\nduplicate = \"reject\"\n", "[ingest]", "duplicate"),
    ("[deidentification]\nproject = \"X\"\n", "[deidentification]", "project"),
    ("[[sites]]\nname = \"a\"\naet = [\"A\"]\n", "[[sites]]", "aet"),
    ("[[auth.tokens]]\nname = \"t\"\nsha256 = \"" + "0" * 64 + "\"\nrole = \"admin\"\n"
     "expires = 1\n", "token 't'", "expires"),
    ("[[move_destinations]]\naet = \"X\"\nhost = \"h\"\nport = 1\ntls = true\n",
     "move destination", "tls"),
    ("[sever]\nhttp_port = 9000\n", "configuration file", "sever"),
])
def test_unknown_settings_are_refused_in_every_table(tmp_path, text, where, key):
    """A misspelt setting is an error naming its table and the setting, never ignored."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert where in str(caught.value) and key in str(caught.value)


@pytest.mark.parametrize("value", ['"lots"', "0", "-1", "1.5", "true"])
def test_limits_must_be_positive_integers(tmp_path, value):
    rejected(tmp_path, f"[limits]\nqido_max_limit = {value}\n", match="qido_max_limit")


def test_blob_segments_are_at_least_one_mebibyte(tmp_path):
    assert load(tmp_path, "[limits]\nblob_segment_bytes = 1048576\n").limits == Limits(
        blob_segment_bytes=1048576)
    rejected(tmp_path, "[limits]\nblob_segment_bytes = 65536\n", match="blob_segment_bytes")


@pytest.mark.parametrize("text", ["limits = 5\n", "server = 5\n"])
def test_sections_must_be_tables(tmp_path, text):
    rejected(tmp_path, text)


@pytest.mark.parametrize("port", ['"http"', "70000", "-1", "true"])
def test_bad_ports_rejected(tmp_path, port):
    rejected(tmp_path, f"[server]\nhttp_port = {port}\n", match="http_port")


@pytest.mark.parametrize("title", ['""', '"SEVENTEEN_CHARS_X"', '"RICORD\\n"', "5"])
def test_bad_ae_title_rejected(tmp_path, title):
    rejected(tmp_path, f"[server]\nae_title = {title}\n", match="ae_title")


def test_unreadable_or_invalid_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.toml", env={})
    rejected(tmp_path, "[server\n")


# --- DIMSE security: allowed addresses, TLS -----------------------------------------------------


def test_site_addresses_are_networks(tmp_path):
    config = load(tmp_path, sites_toml('name = "a"\naets = ["A"]\naddresses = ["10.0.0.0/8", '
                                       '"192.168.1.7", "2001:db8::/32"]', 'name = "b"'))
    assert [str(n) for n in config.sites[0].addresses] == [
        "10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32"
    ]
    assert config.sites[1].addresses == ()


@pytest.mark.parametrize("addresses", ['"10.0.0.0/8"', '["10.0.0.300"]', '["host.example"]', "[8]"])
def test_bad_site_addresses_rejected(tmp_path, addresses):
    rejected(tmp_path, sites_toml(f'name = "a"\naddresses = {addresses}'), match="site 'a'")


def test_tls_is_off_unless_configured(tmp_path):
    assert load(tmp_path, "").tls is None
    config = load(tmp_path, '[tls]\nport = 2762\ncert = "s.crt"\nkey = "s.key"\n')
    assert config.tls.port == 2762
    assert config.tls.cert.is_absolute() and config.tls.cert.name == "s.crt"
    assert config.tls.ca is None and not config.tls.require_client_cert


@pytest.mark.parametrize(("text", "match"), [
    ('port = 2762\ncert = "s.crt"', "cert and key"),
    ('cert = "s.crt"\nkey = "s.key"\nrequire_client_cert = true', "needs ca"),
    ('cert = "s.crt"\nkey = "s.key"\nrequire_client_cert = "yes"', "true or false"),
    ('cert = "s.crt"\nkey = "s.key"\nport = 70000', "port"),
    ('cert = "s.crt"\nkey = "s.key"\nciphers = "ALL"', "unknown"),
    ('cert = 5\nkey = "s.key"', "PEM"),
])
def test_bad_tls_settings_rejected(tmp_path, text, match):
    rejected(tmp_path, f"[tls]\n{text}\n", match=match)


# --- operations: log format and metrics ----------------------------------------------------------


def test_log_format_is_text_unless_json_is_asked_for(tmp_path):
    assert load_config(env={}).log_format == "text"
    assert load(tmp_path, '[server]\nlog_format = "json"\n').log_format == "json"
    assert load(tmp_path, "", env={"RICORD_LOG_FORMAT": "json"}).log_format == "json"
    assert load(tmp_path, '[server]\nlog_format = "json"\n',
                env={"RICORD_LOG_FORMAT": "text"}).log_format == "text"  # env over file
    rejected(tmp_path, '[server]\nlog_format = "xml"\n', "log_format")
    with pytest.raises(ConfigError, match="RICORD_LOG_FORMAT"):
        load(tmp_path, "", env={"RICORD_LOG_FORMAT": "yaml"})


def test_metrics_on_the_http_port_unless_a_port_is_given(tmp_path):
    default = load_config(env={}).metrics
    assert (default.enabled, default.port) == (True, None)
    own = load(tmp_path, '[metrics]\nport = 9464\nhost = "0.0.0.0"\n').metrics
    assert (own.enabled, own.host, own.port) == (True, "0.0.0.0", 9464)
    assert load(tmp_path, "[metrics]\nenabled = false\n").metrics.enabled is False
    rejected(tmp_path, "[metrics]\nport = 70000\n", "port")
    rejected(tmp_path, '[metrics]\nenabled = "yes"\n', "enabled")
    rejected(tmp_path, "[metrics]\npath = 1\n", "unknown setting")


def test_database_pool_size_is_ten_unless_configured(tmp_path):
    assert load_config(env={}).db_pool_size == 10
    assert load(tmp_path, "[server]\ndb_pool_size = 32\n").db_pool_size == 32
    for value in ("0", "1001", '"20"', "true"):
        rejected(tmp_path, f"[server]\ndb_pool_size = {value}\n", "db_pool_size")


def test_instance_partitions_are_128_unless_configured(tmp_path):
    assert load_config(env={}).instance_partitions == 128
    assert load(tmp_path, "[server]\ninstance_partitions = 16\n").instance_partitions == 16
    for value in ("0", "1025", '"16"', "true", "1.5"):
        rejected(tmp_path, f"[server]\ninstance_partitions = {value}\n",
                 "instance_partitions must be an integer from 1 to 1024")
