"""Configuration: TOML file, overridden by RICORD_* environment variables, overridden by flags.

Loaded once into frozen dataclasses and passed down; nothing reads the environment later.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ricord_archive.deid.policy import DEFAULT_SOP_CLASSES, sop_class_uids

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_SITE_NAME = "default"
_SITEID = re.compile(r"^[1-9][0-9]{5}\Z")  # \Z, not $: "$" also accepts a trailing newline
_AE_TITLE = re.compile(r"^[\x20-\x7e]{1,16}\Z")


class ConfigError(ValueError):
    """The configuration is unusable; the message says which setting and why."""


@dataclass(frozen=True)
class MoveDestination:
    """A C-MOVE destination: where objects go when a C-MOVE names this AE title."""

    aet: str
    host: str
    port: int


@dataclass(frozen=True)
class SiteConfig:
    name: str
    aets: tuple[str, ...] = ()
    siteid: str | None = None
    default: bool = False
    sop_classes: frozenset[str] = DEFAULT_SOP_CLASSES  # SOP Class UIDs the site may send
    move_destinations: tuple[MoveDestination, ...] = ()  # for C-MOVEs from this site's AEs
    addresses: tuple[Network, ...] = ()  # where its AE titles may call from; (): anywhere
    default_issuer: str = ""  # IssuerOfPatientID for objects that name none ("": none)

    def issuer_of(self, issuer: str) -> str:
        """The issuer a patient is filed under: the object's own, else the site's default."""
        return issuer or self.default_issuer


@dataclass(frozen=True)
class Limits:
    max_object_bytes: int = 2 * 1024**3
    max_stow_bytes: int = 8 * 1024**3
    qido_max_limit: int = 1000
    max_pdu_bytes: int = 1024**2  # the largest P-DATA PDU the archive announces it accepts
    max_associations: int = 32  # more concurrent associations are rejected (local limit)
    network_timeout: int = 60  # seconds a DIMSE peer may stay silent
    acse_timeout: int = 30  # seconds for association negotiation and release
    dimse_timeout: int = 60  # seconds to wait for a DIMSE message
    shutdown_grace: int = 30  # seconds SIGTERM waits for associations in progress
    http_header_timeout: int = 10  # seconds a client has to send a request's headers
    http_body_idle_timeout: int = 30  # seconds a STOW-RS body may stall
    http_send_timeout: int = 60  # seconds a response may wait for a client that does not read
    orphan_collect_interval: int = 3600  # seconds between runs of the orphan collector
    orphan_grace: int = 3600  # seconds before a blob no index row names counts as an orphan
    blob_segment_bytes: int = 256 * 1024**2  # size of the segment files blobs are appended to


ROLES = ("uploader", "researcher", "annotator", "admin")


@dataclass(frozen=True)
class ApiToken:
    """A DICOMweb bearer token, known by its SHA-256 only; `site` for uploaders."""

    name: str  # a label for logs
    sha256: str  # lowercase hex
    role: str
    site: str | None = None


# Signature algorithms an OIDC issuer may use: asymmetric only (no "none", no HMAC, whose
# "secret" would be the issuer's public key).
OIDC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                   "ES512", "EdDSA")


@dataclass(frozen=True)
class OidcConfig:
    """OpenID Connect bearer tokens (JWTs) verified against an issuer's published keys."""

    issuer: str
    audience: tuple[str, ...]
    jwks_url: str | None = None  # the issuer's JWKS, or
    jwks_file: Path | None = None  # a local copy of it
    algorithms: tuple[str, ...] = ("RS256",)
    role_claim: str = "ricord_role"  # dotted path, e.g. "realm_access.roles"
    site_claim: str = "ricord_site"
    leeway: int = 30  # seconds of clock skew tolerated on exp and nbf


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool = False
    tokens: tuple[ApiToken, ...] = ()
    oidc: OidcConfig | None = None


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS on a second DIMSE port (TLS 1.2 or later), same host and AE title."""

    port: int
    cert: Path  # PEM certificate (chain) of the archive
    key: Path  # PEM private key of the archive
    ca: Path | None = None  # PEM CA certificate(s) client certificates are verified against
    require_client_cert: bool = False


@dataclass(frozen=True)
class S3Config:
    """Blobs in an S3-compatible object store instead of `<data-dir>/blobs`."""

    bucket: str
    endpoint: str = ""  # e.g. http://127.0.0.1:8333 for an on-premises store; empty: AWS
    prefix: str = ""  # keys go under this prefix in the bucket
    region: str = "us-east-1"
    path_style: bool = True  # http://endpoint/bucket/key (on-premises stores want this)
    access_key_id: str | None = None  # prefer RICORD_S3_ACCESS_KEY_ID
    secret_access_key: str | None = field(default=None, repr=False)  # RICORD_S3_SECRET_ACCESS_KEY


@dataclass(frozen=True)
class MetricsConfig:
    """`GET /metrics` (Prometheus): on the HTTP port, or with `port` on a listener of its own
    (and then not on the HTTP port)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int | None = None


@dataclass(frozen=True)
class Config:
    data_dir: Path = Path("data")
    http_host: str = "127.0.0.1"
    http_port: int = 8042
    tls_cert: Path | None = None  # with tls_key: the HTTP listener speaks HTTPS
    tls_key: Path | None = None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    dimse_host: str = "127.0.0.1"
    dimse_port: int = 11112
    ae_title: str = "RICORD"
    database_url: str | None = None
    read_database_url: str | None = None  # a read replica for queries and metadata
    db_pool_size: int = 10  # connections each server process keeps to the index at most
    instance_partitions: int = 128  # of the instance table; applies when the index is created
    secret_key: str | None = None
    sites: tuple[SiteConfig, ...] = (SiteConfig(DEFAULT_SITE_NAME, default=True),)
    accept_any_calling_aet: bool = True
    project_name: str = "RICORD"
    cors_origins: tuple[str, ...] = ("*",)
    processes: int = 0  # server processes sharing the ports; 0: one per CPU (at most 8)
    ingest_workers: int = 0  # processes de-identifying; 0: threads of the server process
    duplicates: str = "keep-first"  # a re-sent SOP Instance UID with other content
    limits: Limits = field(default_factory=Limits)
    move_destinations: tuple[MoveDestination, ...] = ()  # for C-MOVEs from any calling AE
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig | None = None
    s3: S3Config | None = None  # None: blobs under <data_dir>/blobs
    audit: bool = True  # the audit trail (audit_event table)
    log_format: str = "text"  # or "json": one JSON object a line
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def default_site(self) -> SiteConfig:
        return next(s for s in self.sites if s.default)

    def site_for_aet(self, calling_aet: str) -> SiteConfig | None:
        """The site a calling AE title belongs to, or None when it is not recognised."""
        for site in self.sites:
            if calling_aet in site.aets:
                return site
        return self.default_site if self.accept_any_calling_aet else None

    def move_destination(self, aet: str, calling_aet: str) -> MoveDestination | None:
        """Where a C-MOVE from `calling_aet` to `aet` goes: the calling site's own destinations
        first, then the global ones; None when the destination is unknown."""
        site = self.site_for_aet(calling_aet)
        own = site.move_destinations if site is not None else ()
        return next((d for d in (*own, *self.move_destinations) if d.aet == aet), None)

    def site_named(self, name: str) -> SiteConfig:
        for site in self.sites:
            if site.name == name:
                return site
        raise ConfigError(f"no site named {name!r} in the configuration")


def _table(raw: Any, name: str, known: Iterable[str]) -> dict[str, Any]:
    """`raw` as a table whose settings are all `known`; otherwise a ConfigError naming the
    table and every unknown setting (a misspelt setting is never silently ignored)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{name} must be a table")
    allowed = set(known)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{name}: unknown setting(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(allowed))}")
    return raw


_SITE_KEYS = ("name", "aets", "siteid", "default", "sop_classes", "move_destinations",
              "addresses", "default_issuer")


def _parse_sites(raw: Any) -> tuple[tuple[SiteConfig, ...], bool]:
    if raw is None:
        return (SiteConfig(DEFAULT_SITE_NAME, default=True),), True
    if not isinstance(raw, list) or not raw:
        raise ConfigError("[[sites]] must be a non-empty array of tables")
    sites = []
    for entry in raw:
        entry = _table(entry, "every [[sites]] entry", _SITE_KEYS)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError("every [[sites]] entry needs a name")
        aets = entry.get("aets", [])
        if not isinstance(aets, list) or not all(
            isinstance(a, str) and _AE_TITLE.match(a) for a in aets
        ):
            raise ConfigError(f"site {name!r}: aets must be AE titles of 1-16 printable characters")
        siteid = entry.get("siteid")
        if siteid is not None:
            siteid = str(siteid)
            if not _SITEID.match(siteid):
                raise ConfigError(f"site {name!r}: siteid must be 6 digits, not starting with 0")
        sop_classes = DEFAULT_SOP_CLASSES
        if "sop_classes" in entry:
            listed = entry["sop_classes"]
            if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
                raise ConfigError(f"site {name!r}: sop_classes must be a list of UIDs or keywords")
            try:
                sop_classes = sop_class_uids(listed)
            except ValueError as exc:
                raise ConfigError(f"site {name!r}: {exc}") from exc
        sites.append(SiteConfig(
            name, tuple(aets), siteid, bool(entry.get("default", False)), sop_classes,
            _parse_move_destinations(entry.get("move_destinations", []), f"site {name!r}"),
            _parse_addresses(entry.get("addresses", []), name),
            _parse_default_issuer(entry.get("default_issuer", ""), name),
        ))
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError("site names must be unique")
    all_aets = [a for s in sites for a in s.aets]
    if len(set(all_aets)) != len(all_aets):
        raise ConfigError("an AE title may belong to one site only")
    pinned = [s.siteid for s in sites if s.siteid]
    if len(set(pinned)) != len(pinned):
        raise ConfigError("pinned siteids must be unique")
    defaults = [s for s in sites if s.default]
    if len(defaults) > 1:
        raise ConfigError("only one site may be the default")
    if not defaults:
        sites[0] = replace(sites[0], default=True)
    return tuple(sites), False


def _parse_default_issuer(raw: Any, site: str) -> str:
    """A site's default IssuerOfPatientID: a DICOM LO value (at most 64 characters, no
    backslash or control character), stripped as ingest strips the object's own."""
    if not isinstance(raw, str) or len(raw) > 64 or "\\" in raw or any(
        ord(c) < 32 for c in raw
    ):
        raise ConfigError(f"site {site!r}: default_issuer must be an IssuerOfPatientID value "
                          "(text of at most 64 characters, no backslash)")
    return raw.strip()


def _parse_addresses(raw: Any, site: str) -> tuple[Network, ...]:
    """A site's allowed source addresses: IP addresses and CIDR networks."""
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise ConfigError(f"site {site!r}: addresses must be a list of IP addresses or networks")
    try:
        return tuple(ipaddress.ip_network(a.strip(), strict=False) for a in raw)
    except ValueError as exc:
        raise ConfigError(f"site {site!r}: {exc}") from exc


_HOST = re.compile(r"^[A-Za-z0-9.:_-]{1,253}\Z")  # a host name, IPv4 or IPv6 address
_MOVE_DESTINATION_KEYS = frozenset({"aet", "host", "port"})


def _parse_move_destinations(raw: Any, where: str) -> tuple[MoveDestination, ...]:
    """`[[move_destinations]]` tables (aet, host, port), each AE title once."""
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise ConfigError(f"{where}: move_destinations must be an array of tables")
    destinations = []
    for entry in raw:
        _table(entry, f"{where}: a move destination", _MOVE_DESTINATION_KEYS)
        aet, host, port = entry.get("aet"), entry.get("host"), entry.get("port")
        if not isinstance(aet, str) or not _AE_TITLE.match(aet) or aet != aet.strip():
            raise ConfigError(f"{where}: a move destination's aet must be an AE title of 1-16 "
                              "printable characters without surrounding spaces")
        if not isinstance(host, str) or not _HOST.match(host):
            raise ConfigError(f"{where}: move destination {aet!r} needs a host name or address")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"{where}: move destination {aet!r} needs a port (1-65535)")
        destinations.append(MoveDestination(aet, host, port))
    aets = [d.aet for d in destinations]
    if len(set(aets)) != len(aets):
        raise ConfigError(f"{where}: a move destination AE title is listed twice")
    return tuple(destinations)


_SHA256 = re.compile(r"^[0-9a-fA-F]{64}\Z")
_TOKEN_KEYS = frozenset({"name", "sha256", "role", "site"})


def _parse_auth(raw: Any, sites: tuple[SiteConfig, ...]) -> AuthConfig:
    """`[auth]`: enabled, `[[auth.tokens]]` (name, sha256, role, site for uploaders) and
    `[auth.oidc]`."""
    _table(raw, "[auth]", {"enabled", "tokens", "oidc"})
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError("[auth] enabled must be true or false")
    entries = raw.get("tokens", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("[[auth.tokens]] must be an array of tables")
    site_names = {s.name for s in sites}
    tokens = []
    for entry in entries:
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError("every [[auth.tokens]] entry needs a name")
        _table(entry, f"token {name!r}", _TOKEN_KEYS)
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ConfigError(f"token {name!r}: sha256 must be 64 hexadecimal digits (the "
                              "SHA-256 of the token, never the token itself)")
        role = entry.get("role")
        if role not in ROLES:
            raise ConfigError(f"token {name!r}: role must be one of {', '.join(ROLES)}")
        site = entry.get("site")
        if role == "uploader" and (not isinstance(site, str) or site not in site_names):
            raise ConfigError(f"token {name!r}: an uploader needs site = the name of a "
                              "configured site")
        if role != "uploader" and site is not None:
            raise ConfigError(f"token {name!r}: only an uploader is bound to a site")
        tokens.append(ApiToken(name, digest.lower(), role, site))
    if len({t.name for t in tokens}) != len(tokens):
        raise ConfigError("[[auth.tokens]] names must be unique")
    if len({t.sha256 for t in tokens}) != len(tokens):
        raise ConfigError("[[auth.tokens]]: the same sha256 is listed twice")
    oidc = _parse_oidc(raw["oidc"]) if "oidc" in raw else None
    if enabled and not tokens and oidc is None:
        raise ConfigError("[auth] is enabled but neither [[auth.tokens]] nor [auth.oidc] "
                          "are configured")
    return AuthConfig(enabled, tuple(tokens), oidc)


_OIDC_KEYS = frozenset({"issuer", "audience", "jwks_url", "jwks_file", "algorithms",
                        "role_claim", "site_claim", "leeway"})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "[::1]"})


def _jwks_url(value: Any) -> str:
    """https, or http to this machine only (the keys decide who gets in)."""
    if not isinstance(value, str) or not re.match(r"^https?://[^/?#\s]+", value):
        raise ConfigError("[auth.oidc] jwks_url must be an https:// URL")
    scheme, _, rest = value.partition("://")
    host = re.sub(r":[0-9]+$", "", re.split(r"[/?#]", rest, maxsplit=1)[0])
    if scheme != "https" and host not in _LOOPBACK:
        raise ConfigError("[auth.oidc] jwks_url must be an https:// URL (http only on loopback)")
    return value


def _parse_oidc(raw: Any) -> OidcConfig:
    """`[auth.oidc]`: issuer, audience, jwks_url or jwks_file, algorithms, claims, leeway."""
    _table(raw, "[auth.oidc]", _OIDC_KEYS)
    issuer = raw.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        raise ConfigError("[auth.oidc] needs issuer (the iss of its tokens)")
    audience = raw.get("audience")
    audience = [audience] if isinstance(audience, str) else audience
    if not isinstance(audience, list) or not audience or not all(
        isinstance(a, str) and a for a in audience
    ):
        raise ConfigError("[auth.oidc] needs audience (a string or a list of strings)")
    if ("jwks_url" in raw) == ("jwks_file" in raw):
        raise ConfigError("[auth.oidc] needs one of jwks_url and jwks_file")
    jwks_url = _jwks_url(raw["jwks_url"]) if "jwks_url" in raw else None
    jwks_file = raw.get("jwks_file")
    if jwks_file is not None and (not isinstance(jwks_file, str) or not jwks_file):
        raise ConfigError("[auth.oidc] jwks_file must be a path")
    algorithms = raw.get("algorithms", ["RS256"])
    if not isinstance(algorithms, list) or not algorithms or not all(
        a in OIDC_ALGORITHMS for a in algorithms
    ):
        raise ConfigError("[auth.oidc] algorithms must be a list of asymmetric JWS algorithms: "
                          f"{', '.join(OIDC_ALGORITHMS)}")
    claims = {}
    for key, default in (("role_claim", "ricord_role"), ("site_claim", "ricord_site")):
        claims[key] = raw.get(key, default)
        if not isinstance(claims[key], str) or not claims[key]:
            raise ConfigError(f"[auth.oidc] {key} must be a claim name")
    leeway = raw.get("leeway", 30)
    if isinstance(leeway, bool) or not isinstance(leeway, int) or not 0 <= leeway <= 300:
        raise ConfigError("[auth.oidc] leeway must be 0 to 300 seconds")
    return OidcConfig(
        issuer, tuple(audience), jwks_url,
        Path(jwks_file).expanduser() if jwks_file else None, tuple(algorithms),
        claims["role_claim"], claims["site_claim"], leeway,
    )


_TLS_KEYS = frozenset({"port", "cert", "key", "ca", "require_client_cert"})


def _parse_tls(raw: Any) -> TlsConfig | None:
    """`[tls]`: port, cert, key, ca, require_client_cert; absent: no TLS port."""
    if raw is None:
        return None
    _table(raw, "[tls]", _TLS_KEYS)
    paths = {}
    for key in ("cert", "key", "ca"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"[tls] {key} must be the path of a PEM file")
        paths[key] = Path(value).expanduser().resolve() if value else None
    if paths["cert"] is None or paths["key"] is None:
        raise ConfigError("[tls] needs cert and key (PEM files)")
    require = raw.get("require_client_cert", False)
    if not isinstance(require, bool):
        raise ConfigError("[tls] require_client_cert must be true or false")
    if require and paths["ca"] is None:
        raise ConfigError("[tls] require_client_cert needs ca (the CA that signs client "
                          "certificates)")
    return TlsConfig(_port(raw, "port", 2762, "[tls]"), paths["cert"], paths["key"],
                     paths["ca"], require)


def _port(section: Mapping[str, Any], key: str, default: int, where: str = "[server]") -> int:
    value = section.get(key, default)
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if isinstance(value, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"{where} {key} must be a port number (0-65535)")
    return port


def _parse_s3(raw: Any, env: Mapping[str, str]) -> S3Config | None:
    """`[s3]`: bucket, endpoint, prefix, region, path_style, access_key_id,
    secret_access_key (the keys preferably from RICORD_S3_ACCESS_KEY_ID and
    RICORD_S3_SECRET_ACCESS_KEY); absent: blobs on the local filesystem."""
    if raw is None:
        return None
    _table(raw, "[s3]", {f.name for f in fields(S3Config)})
    if not isinstance(raw.get("bucket"), str) or not raw["bucket"]:
        raise ConfigError("[s3] needs a bucket")
    for key in ("endpoint", "prefix", "region", "access_key_id", "secret_access_key"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"[s3] {key} must be a string")
    if "path_style" in raw and not isinstance(raw["path_style"], bool):
        raise ConfigError("[s3] path_style must be true or false")
    endpoint = raw.get("endpoint", "")
    if endpoint and not re.match(r"^https?://[^/\s]+/?$", endpoint):
        raise ConfigError("[s3] endpoint must be http(s)://host[:port]")
    values = dict(raw)
    for var, key in (("RICORD_S3_ACCESS_KEY_ID", "access_key_id"),
                     ("RICORD_S3_SECRET_ACCESS_KEY", "secret_access_key")):
        if env.get(var):
            values[key] = env[var]
    values["prefix"] = values.get("prefix", "").strip("/")
    return S3Config(**values)


def _parse_limits(raw: Any) -> Limits:
    _table(raw, "[limits]", (f.name for f in fields(Limits)))
    values = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"[limits] {key} must be a positive integer")
        values[key] = value
    if values.get("blob_segment_bytes", Limits.blob_segment_bytes) < 1024**2:
        raise ConfigError("[limits] blob_segment_bytes must be at least 1048576 (1 MiB)")
    return Limits(**values)


DUPLICATE_POLICIES = ("keep-first", "reject", "overwrite")


def _duplicates(section: Any) -> str:
    _table(section, "[ingest]", ("duplicates",))
    policy = section.get("duplicates", "keep-first")
    if policy not in DUPLICATE_POLICIES:
        raise ConfigError(f"[ingest] duplicates must be one of {', '.join(DUPLICATE_POLICIES)}")
    return policy


def _workers(value: Any) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 256:
        raise ConfigError("ingest_workers must be an integer from 0 (threads) to 256")
    return value


def _db_pool_size(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1000:
        raise ConfigError("db_pool_size must be an integer from 1 to 1000")
    return value


def _instance_partitions(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1024:
        raise ConfigError("instance_partitions must be an integer from 1 to 1024")
    return value


def _processes(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 64:
        raise ConfigError("processes must be an integer from 1 to 64 (0: one per CPU)")
    return value


def _cors_origins(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError("cors_origins must be a list of origins (or [\"*\"] for any)")
    return tuple(value)


def _tls(server: Mapping[str, Any]) -> tuple[Path | None, Path | None]:
    """`tls_cert` and `tls_key`: both (HTTPS) or neither (HTTP)."""
    cert, key = server.get("tls_cert"), server.get("tls_key")
    if (cert is None) != (key is None):
        raise ConfigError("[server] tls_cert and tls_key go together (a PEM certificate chain "
                          "and its private key)")
    for name, value in (("tls_cert", cert), ("tls_key", key)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"[server] {name} must be a file path")
    if cert is None or key is None:
        return None, None
    return Path(cert).expanduser(), Path(key).expanduser()


def _trusted_proxies(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses or networks (CIDR) of reverse proxies whose X-Forwarded-*/Forwarded count."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError("[server] trusted_proxies must be a list of addresses or CIDR networks")
    try:
        return tuple(ipaddress.ip_network(v, strict=True) for v in value)
    except ValueError as exc:
        raise ConfigError(f"[server] trusted_proxies: {exc}") from exc


def _log_format(value: Any) -> str:
    if value not in ("text", "json"):
        raise ConfigError('log_format (RICORD_LOG_FORMAT) must be "text" or "json"')
    return value


def _parse_metrics(raw: Any) -> MetricsConfig:
    """`[metrics]`: enabled, host and port (a listener of its own; absent: the HTTP port)."""
    _table(raw, "[metrics]", {"enabled", "host", "port"})
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError("[metrics] enabled must be true or false")
    host = raw.get("host", "127.0.0.1")
    if not isinstance(host, str) or not _HOST.match(host):
        raise ConfigError("[metrics] host must be a host name or address")
    port = _port(raw, "port", 0, "[metrics]") if "port" in raw else None
    return MetricsConfig(enabled, host, port)


def _audit(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError("audit must be true or false")
    return value


def _project_name(section: Any) -> str:
    _table(section, "[deidentification]", ("project_name",))
    name = section.get("project_name", "RICORD")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9 _.-]{1,16}", name):
        raise ConfigError("project_name must be 1-16 letters, digits, spaces, '_', '.' or '-'")
    return name


def _check_database_url(key: str, url: Any) -> None:
    """A PostgreSQL URL or None; the message never repeats the URL (it may hold a password)."""
    if url is None:
        return
    if not isinstance(url, str) or not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{key} must be a PostgreSQL URL (postgresql://...)")
    try:
        _ = urlsplit(url).port  # raises on a port that is not a number
    except ValueError:
        raise ConfigError(f"{key}: the port is not a number from 0 to 65535") from None


_TABLES = ("server", "sites", "limits", "ingest", "deidentification", "move_destinations",
           "auth", "tls", "s3", "metrics")
_SERVER_KEYS = ("data_dir", "http_host", "http_port", "tls_cert", "tls_key", "trusted_proxies",
                "dimse_host", "dimse_port", "ae_title", "database_url", "read_database_url",
                "secret_key", "cors_origins", "processes", "ingest_workers", "audit",
                "log_format", "db_pool_size", "instance_partitions")


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration from the file, then the environment, then explicit overrides."""
    env = os.environ if env is None else env
    if path is None and env.get("RICORD_CONFIG"):
        path = Path(env["RICORD_CONFIG"])
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc}") from exc
    _table(raw, "the configuration file", _TABLES)
    server = _table(raw.get("server", {}), "[server]", _SERVER_KEYS)
    sites, accept_any = _parse_sites(raw.get("sites"))
    limits_raw = raw.get("limits", {})
    tls_cert, tls_key = _tls(server)
    values: dict[str, Any] = {
        "data_dir": Path(server.get("data_dir", "data")),
        "http_host": server.get("http_host", "127.0.0.1"),
        "http_port": _port(server, "http_port", 8042),
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "trusted_proxies": _trusted_proxies(server.get("trusted_proxies", [])),
        "dimse_host": server.get("dimse_host", "127.0.0.1"),
        "dimse_port": _port(server, "dimse_port", 11112),
        "ae_title": server.get("ae_title", "RICORD"),
        "database_url": server.get("database_url"),
        "read_database_url": server.get("read_database_url"),
        "db_pool_size": _db_pool_size(server.get("db_pool_size", 10)),
        "instance_partitions": _instance_partitions(server.get("instance_partitions", 128)),
        "secret_key": server.get("secret_key"),
        "sites": sites,
        "accept_any_calling_aet": accept_any,
        "project_name": _project_name(raw.get("deidentification", {})),
        "cors_origins": _cors_origins(server.get("cors_origins", ["*"])),
        "processes": _processes(server.get("processes", 0)),
        "ingest_workers": _workers(server.get("ingest_workers")),
        "duplicates": _duplicates(raw.get("ingest", {})),
        "limits": _parse_limits(limits_raw),
        "move_destinations": _parse_move_destinations(
            raw.get("move_destinations", []), "[[move_destinations]]"
        ),
        "auth": _parse_auth(raw.get("auth", {}), sites),
        "tls": _parse_tls(raw.get("tls")),
        "s3": _parse_s3(raw.get("s3"), env),
        "audit": _audit(server.get("audit", True)),
        "log_format": _log_format(env.get("RICORD_LOG_FORMAT") or server.get("log_format",
                                                                             "text")),
        "metrics": _parse_metrics(raw.get("metrics", {})),
    }
    for var, key in (
        ("RICORD_DATA_DIR", "data_dir"),
        ("RICORD_DATABASE_URL", "database_url"),
        ("RICORD_READ_DATABASE_URL", "read_database_url"),
        ("RICORD_SECRET_KEY", "secret_key"),
    ):
        if env.get(var):
            values[key] = env[var]
    if env.get("RICORD_PROCESSES"):
        try:
            values["processes"] = _processes(int(env["RICORD_PROCESSES"]))
        except ValueError:
            raise ConfigError("RICORD_PROCESSES must be an integer") from None
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    values["data_dir"] = Path(values["data_dir"]).expanduser().resolve()
    _check_database_url("read_database_url", values["read_database_url"])
    if not isinstance(values["ae_title"], str) or not _AE_TITLE.match(values["ae_title"]):
        raise ConfigError("ae_title must be 1-16 printable characters")
    return Config(**values)
