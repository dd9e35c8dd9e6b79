"""Who may associate: DICOM TLS for the TLS port, and per-site allowed source addresses."""

from __future__ import annotations

import ipaddress
import logging
import ssl

from pynetdicom import evt

from ricord_archive.config import ConfigError, Network, SiteConfig, TlsConfig

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected permanent, by the service user, calling AE title not recognised
_REJECT_CALLING_AET = (0x01, 0x01, 0x03)


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The TLS context of the TLS port: TLS 1.2 or later, the archive's certificate, and client
    certificates verified against `tls.ca` (required when `tls.require_client_cert`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
        if tls.ca is not None:
            context.load_verify_locations(cafile=tls.ca)
            context.verify_mode = (
                ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
            )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[tls]: cannot load the certificate, key or CA file: {exc}") from exc
    return context


class AllowedAddresses:
    """Rejects an association whose calling AE title belongs to a site listing `addresses`
    when it comes from elsewhere (A-ASSOCIATE-RJ, calling AE title not recognised)."""

    def __init__(self, sites: tuple[SiteConfig, ...]) -> None:
        self._networks: dict[str, tuple[Network, ...]] = {
            aet: site.addresses for site in sites if site.addresses for aet in site.aets
        }

    def allows(self, calling_aet: str, address: str) -> bool:
        networks = self._networks.get(calling_aet.strip())
        if networks is None:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in networks)

    def on_requested(self, event: evt.Event) -> None:
        """EVT_REQUESTED: reject before negotiation, as pynetdicom rejects an unknown AE."""
        assoc = event.assoc
        calling_aet = str(assoc.requestor.primitive.calling_ae_title)
        if self.allows(calling_aet, assoc.requestor.address):
            return
        log.warning(
            "association from %s:%s rejected: calling AE title %r is not allowed from this "
            "address", assoc.requestor.address, assoc.requestor.port, calling_aet.strip(),
        )
        assoc.acse.send_reject(*_REJECT_CALLING_AET)
        assoc.kill()
