"""Ed25519 signatures of ``.pinf`` bundles: keys as PEM (or OpenSSH) files, through ``cryptography``.

The signature covers the exact ``manifest.json`` bytes; the manifest pins every other member of
the bundle by size and sha256 (and names no file outside it: ``package_paths``), so a valid
signature vouches for every byte the runtime loads from the bundle. ``cryptography`` is imported
only when signing or verifying (``pip install "portable-infer[sign]"``).
"""

from __future__ import annotations

import os
from pathlib import Path

from portable_infer.errors import InvalidArgumentError, SignatureError, require


def _crypto():
    require("cryptography", extra="sign")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519, InvalidSignature


def _key_bytes(key) -> bytes:
    if isinstance(key, (bytes, bytearray)):
        return bytes(key)
    try:
        return Path(key).read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read key file {key}: {exc}") from exc


def load_private_key(key, password: bytes | None = None):
    """An Ed25519 private key from a PEM file path (or PEM bytes)."""
    serialization, ed25519, _ = _crypto()
    try:
        k = serialization.load_pem_private_key(_key_bytes(key), password=password)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"signing key {key!r} is not a readable PEM private key ({exc}); create one "
                                   f"with: openssl genpkey -algorithm ed25519 -out key.pem") from exc
    if not isinstance(k, ed25519.Ed25519PrivateKey):
        raise InvalidArgumentError(f"signing key {key!r} is a {type(k).__name__}, bundles are signed with "
                                   f"Ed25519: openssl genpkey -algorithm ed25519 -out key.pem")
    return k


def load_public_key(key):
    """An Ed25519 public key from a PEM (or OpenSSH ``ssh-ed25519``) file path or bytes."""
    serialization, ed25519, _ = _crypto()
    data = _key_bytes(key)
    try:
        k = (serialization.load_ssh_public_key(data) if data.lstrip().startswith(b"ssh-")
             else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"trusted key {key!r} is not a readable public key ({exc}); derive it with: "
                                   f"openssl pkey -in key.pem -pubout -out key.pub.pem") from exc
    if not isinstance(k, ed25519.Ed25519PublicKey):
        raise InvalidArgumentError(f"trusted key {key!r} is a {type(k).__name__}; bundles use Ed25519 keys")
    return k


def write_keypair(private_path, public_path) -> None:
    """Create an Ed25519 key pair as PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key)."""
    serialization, ed25519, _ = _crypto()
    k = ed25519.Ed25519PrivateKey.generate()
    Path(private_path).write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    os.chmod(private_path, 0o600)
    Path(public_path).write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))


def verify_signature(manifest_bytes: bytes, signature: bytes, trust, where: str = "bundle") -> None:
    """Raise :class:`SignatureError` unless ``signature`` signs ``manifest_bytes`` under ``trust``."""
    _, _, invalid = _crypto()
    key = load_public_key(trust)
    try:
        key.verify(signature, manifest_bytes)
    except invalid:
        raise SignatureError(f"{where}: the Ed25519 signature does not match the trusted key {trust}: the "
                             f"bundle was modified after signing, or signed with another key") from None
