"""TLS options for ``amqps://`` URLs, and the ``ssl.SSLContext`` they make. No pika."""

from __future__ import annotations

import dataclasses
import ssl

from fibrpc.errors import ConfigError


@dataclasses.dataclass(frozen=True, slots=True)
class TLSOptions:
    """TLS settings for an ``amqps://`` URL. Certificates are checked unless ``verify``
    is turned off: against ``ca_file`` if given, else the system's trusted CAs, and the
    certificate must name the URL's host. ``cert_file`` and ``key_file`` present a client
    certificate (for brokers that require one)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    def context(self) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` for these options; ``ConfigError`` if a file is bad."""
        if self.key_file and not self.cert_file:
            raise ConfigError("A TLS key file needs its certificate: give --tls-cert-file too.")
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        try:
            if self.ca_file:
                context.load_verify_locations(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"Cannot load the CA file {self.ca_file!r}: {exc}.") from exc
        try:
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"Cannot load the client certificate {self.cert_file!r} with key "
                f"{self.key_file!r}: {exc}."
            ) from None
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context
