"""TLS to the job servers: one client context, built and checked up front.

Every file is read when the settings load (and again as the run user when
the daemon starts), so an unreadable key or a key that does not match its
certificate stops --check and the start with the option named, instead of
showing up later as "job server unreachable".  The server's certificate
must chain to ssl_ca and name the host the worker connects to.
"""
import re
import ssl


class TlsMaterialError(Exception):
    def __init__(self, option, path, why):
        super().__init__(f"{option}: {path}: {why}")
        self.option, self.path, self.why = option, path, why


def _readable(option, path):
    try:
        with open(path, "rb") as stream:
            stream.read(1)
    except OSError as error:
        raise TlsMaterialError(option, path, f"cannot read: {error.strerror}") from None


def client_context(ssl_key, ssl_cert, ssl_ca):
    """An SSLContext that verifies the server (chain and host name) and shows our certificate."""
    for option, path in (("[gearman] ssl_key", ssl_key), ("[gearman] ssl_cert", ssl_cert),
                         ("[gearman] ssl_ca", ssl_ca)):
        _readable(option, path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED and check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=ssl_ca)
    except (ssl.SSLError, ValueError) as error:
        raise TlsMaterialError("[gearman] ssl_ca", ssl_ca, f"not a CA certificate file ({_short(error)})") from None
    _certificate("[gearman] ssl_cert", ssl_cert)
    try:
        # An encrypted key gets an empty password instead of a prompt on a terminal.
        context.load_cert_chain(ssl_cert, ssl_key, password=lambda: b"")
    except ssl.SSLError as error:
        text = _short(error)
        if "KEY_VALUES_MISMATCH" in text:
            raise TlsMaterialError("[gearman] ssl_key", ssl_key, f"does not match the certificate {ssl_cert}") from None
        raise TlsMaterialError("[gearman] ssl_key", ssl_key,
                               f"not a usable unencrypted private key ({text})") from None
    return context


def _certificate(option, path):
    """The file holds at least one PEM certificate (load_cert_chain blames both files alike)."""
    with open(path, "rb") as stream:
        text = stream.read(1 << 20).decode("ascii", "replace")
    match = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    try:
        if match is None:
            raise ValueError("no PEM certificate in it")
        ssl.PEM_cert_to_DER_cert(match.group(0))
    except ValueError as error:
        raise TlsMaterialError(option, path, f"not a certificate ({error})") from None


def settings_context(gearman_settings):
    """The context for these [gearman] settings, or None without TLS."""
    if not gearman_settings.ssl_key:
        return None
    return client_context(gearman_settings.ssl_key, gearman_settings.ssl_cert, gearman_settings.ssl_ca)


def problem(gearman_settings):
    """One line naming the option when the TLS material is unusable (by this uid), else None."""
    try:
        settings_context(gearman_settings)
    except TlsMaterialError as error:
        return str(error)
    return None


def _short(error):
    return str(error).replace("\n", " ")


def describe(error):
    """An SSL error during a handshake → one line that says why."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS: the job server's certificate was refused: {error.verify_message}"
    return f"TLS: {_short(error)}"
