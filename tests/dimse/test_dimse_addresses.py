"""Per-site allowed source addresses: a calling AE title of a site that lists addresses is
rejected (A-ASSOCIATE-RJ, calling AE title not recognised) from any other address."""

from __future__ import annotations

import ipaddress

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from ricord_archive.config import SiteConfig, load_config
from ricord_archive.dimse.security import AllowedAddresses
from tests.conftest import Archive

ALLOWED, OTHER = "127.0.0.1", "127.0.0.2"  # both loopback: the second is "another host"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    base = tmp_path_factory.mktemp("addresses")
    config = base / "config.toml"
    config.write_text(
        '[[sites]]\nname = "locked"\naets = ["LOCKED"]\n'
        'addresses = ["127.0.0.1/32", "10.0.0.0/8"]\n'
        '[[sites]]\nname = "open"\naets = ["OPEN"]\n'
    )
    archive = Archive(base / "data", base / "archive.log", config).start()
    yield archive
    archive.stop()


def associate(archive: Archive, calling: str, source: str):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 30
    ae.add_requested_context(Verification)
    return ae.associate(
        "127.0.0.1", archive.dimse_port, ae_title="RICORD", bind_address=(source, 0)
    )


@pytest.mark.parametrize(("calling", "source"), [
    ("LOCKED", ALLOWED), ("OPEN", ALLOWED), ("OPEN", OTHER),
])
def test_allowed_calling_aets_and_addresses_associate(archive, calling, source):
    assoc = associate(archive, calling, source)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_a_site_ae_title_from_another_address_is_rejected(archive):
    assoc = associate(archive, "LOCKED", OTHER)
    assert assoc.is_rejected
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)
    assert f"association from {OTHER}:" in archive.log()
    assert "'LOCKED' is not allowed from this address" in archive.log()


def test_addresses_match_ipv4_mapped_peers_and_only_the_listed_ae_titles():
    sites = load_config(env={}).sites[0], SiteConfig(
        "locked", ("LOCKED",), addresses=(ipaddress.ip_network("10.0.0.0/8"),)
    )
    allowed = AllowedAddresses(sites)
    assert allowed.allows("LOCKED", "10.1.2.3")
    assert allowed.allows("LOCKED  ", "::ffff:10.1.2.3")
    assert not allowed.allows("LOCKED", "11.1.2.3")
    assert not allowed.allows("LOCKED", "::1")
    assert allowed.allows("ANYONE", "11.1.2.3")
