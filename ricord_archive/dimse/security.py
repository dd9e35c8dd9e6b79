"""Who may associate: DICOM TLS for the TLS port, and per-site allowed source addresses."""

from __future__ import annotations

import ipaddress
import ssl

from ricord_archive.config import ConfigError, Network, SiteConfig, TlsConfig


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
    """Whether a calling AE title may associate from an address: a site listing `addresses`
    allows its AE titles from those networks only."""

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
