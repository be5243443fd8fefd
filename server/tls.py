"""Server TLS whose certificate files can be replaced while the server runs.

grpcio's dynamic server credentials ask a fetcher for a new certificate configuration at the start of
every TLS handshake (on gRPC's own threads; this works for grpc.aio servers too). Ours answers from the
files: when a stat of the certificate, key or client CA file differs from the one loaded (or after
reload(), on SIGHUP), it reads them again. New connections then get the new certificate; connections
already open, and the streams on them, keep the one they were set up with.

A new set is checked before it is handed to gRPC (key matches certificate, not expired, CA parses), so
a half-written rotation (certificate written, key not yet) keeps the current certificate: it is logged
once and tried again when the files change again.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int], ...]  # (inode, size, mtime_ns) of each file


class CertificateError(ValueError):
    """The certificate files cannot serve: unreadable, unparsable, mismatched or expired."""


@dataclass(frozen=True)
class _Loaded:
    config: grpc.ServerCertificateConfiguration
    description: str  # for the log: subject, expiry, files


def _public(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class ServerCertificates:
    """The files of settings.tls_cert / tls_key / tls_client_ca (empty: no mutual TLS).

    Raises CertificateError at construction when they cannot serve."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self.files = tuple(f for f in (cert_file, key_file, client_ca_file) if f)
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._lock = threading.Lock()  # the fetcher runs on gRPC threads, reload() on the event loop
        self._failed: Signature | None = None  # the files' signature whose load failed (logged once)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        try:  # the stat before the read, as in _check(): a write after it shows as a change
            signature = self._stat()
        except OSError:
            signature = ()  # _load() names the missing file
        self._initial = self._load()
        self._signature = signature
        self.description = self._initial.description

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial.config, self._fetch,  # type: ignore[arg-type]  # grpc-stubs: the fetcher may return None
            require_client_authentication=self.mutual)

    def reload(self) -> bool:
        """Read the files now (SIGHUP), changed or not; True when they were loaded for new connections."""
        return self._check(force=True)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration to use from this handshake on, or None to keep the current."""
        try:
            self._check(force=False)
        except Exception:  # never let an error escape into gRPC's handshake
            log.exception("TLS: checking the certificate files failed; keeping the current certificate")
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def _check(self, force: bool) -> bool:
        with self._lock:
            try:
                signature = self._stat()
            except OSError as err:  # e.g. between the unlink and the rename of a rotation
                if force:
                    log.error("TLS: keeping the current certificate: %s", err)
                return False
            if signature == self._signature and not force:
                return False
            if signature == self._failed and not force:
                return False
            try:
                loaded = self._load()
            except CertificateError as err:
                if signature != self._failed or force:
                    log.error("TLS: keeping the current certificate: %s", err)
                self._failed = signature
                return False
            # The stat taken before reading: a write after it shows as a change at the next handshake.
            self._signature, self._failed, self._pending = signature, None, loaded.config
        log.info("TLS: loaded %s; new connections use it", loaded.description)
        return True

    def _stat(self) -> Signature:
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in map(os.stat, self.files))

    def _load(self) -> _Loaded:
        try:
            cert_pem = _read(self.cert_file)
            key_pem = _read(self.key_file)
            ca_pem = _read(self.client_ca_file) if self.client_ca_file else None
            chain = x509.load_pem_x509_certificates(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
            if ca_pem is not None:
                x509.load_pem_x509_certificates(ca_pem)
        except (ValueError, TypeError) as err:  # TypeError: an encrypted key
            raise CertificateError(f"{self.cert_file} / {self.key_file} / {self.client_ca_file or '-'}: {err}") from err
        leaf = chain[0]
        if _public(leaf.public_key()) != _public(key.public_key()):
            raise CertificateError(f"the key in {self.key_file} does not belong to the certificate in {self.cert_file}")
        expires = leaf.not_valid_after_utc
        if expires <= datetime.datetime.now(datetime.UTC):
            raise CertificateError(f"the certificate in {self.cert_file} expired on {expires:%Y-%m-%d %H:%M} UTC")
        config = grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca_pem)
        clients = f", client certificates checked against {self.client_ca_file}" if ca_pem else ""
        return _Loaded(config, f"certificate {leaf.subject.rfc4514_string()} (expires {expires:%Y-%m-%d %H:%M} UTC) "
                               f"from {self.cert_file}{clients}")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise CertificateError(f"cannot read {path}: {err.strerror}") from err
