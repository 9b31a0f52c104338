"""The data plane's wire protocol: the headers a signed request carries, the routes, the size
limit, and every error a node answers with (JSON ``{"code", "message", "fields"}``, sent back
by code so that the client raises the same class the server did)."""

from __future__ import annotations

from typing import Any

from core.errors import FlexError
from training.errors import BlobNotFoundError

HEADER_ADDRESS = "X-Flex-Address"
HEADER_TIMESTAMP = "X-Flex-Timestamp"
HEADER_SIGNATURE = "X-Flex-Signature"
HEADER_NONCE = "X-Flex-Nonce"
# Allowed clock difference between requester and server, both ways. Long enough for devices
# whose clocks drift, short enough that a captured request is soon worthless.
DEFAULT_WINDOW_SECONDS = 60
# Versioned so that a signature over one message shape can never verify under another.
SCHEME = "FLEX-DATAPLANE-V2"
# Refuse to serve or fetch blobs above this by default (as worker.config's max_model_bytes).
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
MODELS_PATH = "/models/"
# GET /models/<id>[,<id>...]/chunks/<index>[,<index>...]: those chunks of each model with its
# header and one Merkle proof for them all (binary, training.serialize.Openings, model by model
# and chunk by chunk in the order asked), at most MAX_OPENINGS chunks of MAX_OPENED_MODELS
# models per request: a watcher opens chunks of every update of a round at once.
CHUNKS_SEGMENT = "/chunks/"
OPENINGS_TYPE = "application/octet-stream"
MAX_OPENINGS = 64
MAX_OPENED_MODELS = 32


class DataPlaneError(FlexError):
    """A data-plane request failed."""

    code = "dataplane_error"
    status: int = 500


class AuthError(DataPlaneError):
    """The request's signature does not authenticate it."""

    code = "auth_failed"
    status = 401


class SignatureMissingError(AuthError):
    """The request is not signed."""

    code = "auth_missing"

    def default_message(self, *, header: str = "?", **_: Any) -> str:
        return f"unsigned request: header {header} is missing"


class SignatureMalformedError(AuthError):
    """A signature header is malformed."""

    code = "auth_malformed"

    def default_message(self, *, header: str = "?", reason: str = "malformed", **_: Any) -> str:
        return f"header {header}: {reason}"


class SignatureMismatchError(AuthError):
    """The signature was not made by the claimed address for this request and this server."""

    code = "auth_bad_signature"

    def default_message(self, *, claimed: str = "?", **_: Any) -> str:
        return (
            f"signature does not match {claimed} for this method, path, host, server, "
            "timestamp and nonce"
        )


class SignatureExpiredError(AuthError):
    """The request's timestamp is outside the accepted window."""

    code = "auth_expired"

    def default_message(
        self, *, timestamp: int = 0, server_time: int = 0, window: int = 0, **_: Any
    ) -> str:
        return (
            f"request timestamp {timestamp} is {abs(server_time - timestamp)} s away from the "
            f"server's clock {server_time} (window {window} s); check the clocks"
        )


class SignatureReplayedError(AuthError):
    """The request's nonce was used before: a signed request is good once."""

    code = "auth_replayed"

    def default_message(self, *, nonce: str = "?", **_: Any) -> str:
        return f"nonce {nonce} was already used: sign each request afresh"


class PeerCertificateError(DataPlaneError):
    """The peer's TLS certificate is not the one pinned for it."""

    code = "peer_certificate_mismatch"

    def default_message(self, *, url: str = "?", expected: str = "?", **_: Any) -> str:
        return (
            f"{url} presented another TLS certificate than the one registered for it "
            f"(SHA-256 {expected}); nothing was sent"
        )


class FetchDeadlineError(DataPlaneError):
    """The fetch did not finish before its deadline."""

    code = "fetch_deadline"

    def default_message(
        self, *, url: str = "?", deadline_s: float = 0, received_bytes: int = 0, **_: Any
    ) -> str:
        return f"fetching {url} took longer than {deadline_s} s ({received_bytes} bytes received)"


class AccessDeniedError(DataPlaneError):
    """The access policy does not let this requester fetch this model."""

    code = "access_denied"
    status = 403

    def default_message(
        self, *, requester: str = "?", model_id: str = "?", reason: str = "not allowed", **_: Any
    ) -> str:
        return f"{requester} may not fetch model {model_id}: {reason}"


class ModelTooLargeError(DataPlaneError):
    """The model blob is larger than the size limit."""

    code = "model_too_large"
    status = 413

    def default_message(
        self, *, model_id: str = "?", size: int = 0, limit: int = 0, **_: Any
    ) -> str:
        return f"model {model_id} is {size} bytes, over the limit of {limit} bytes"


class ModelIdMalformedError(DataPlaneError):
    """The request names no valid model ID."""

    code = "model_id_malformed"
    status = 400

    def default_message(self, *, value: str = "?", **_: Any) -> str:
        return f"not a model ID (0x + 64 hex digits): {value!r}"


class ModelListError(DataPlaneError):
    """A chunk request names no models, or more than one request may open."""

    code = "model_list_invalid"
    status = 400

    def default_message(self, *, count: str = "?", **_: Any) -> str:
        return (
            f"ask for the chunks of 1 to {MAX_OPENED_MODELS} models at once, separated by "
            f"commas, not {count}"
        )


class RouteNotFoundError(DataPlaneError):
    """The data plane has no such route."""

    code = "route_not_found"
    status = 404

    def default_message(self, *, path: str = "?", **_: Any) -> str:
        return f"no data-plane route {path}; try GET {MODELS_PATH}<0x model id> or GET /health"


class ChunkIndexError(DataPlaneError):
    """The request names no chunk of the model: not a number, or past the last chunk."""

    code = "chunk_index_invalid"
    status = 404

    def default_message(self, *, model_id: str = "?", index: str = "?", **_: Any) -> str:
        return (
            f"model {model_id} has no chunk {index} (ask for 1 to {MAX_OPENINGS} chunk numbers, "
            "separated by commas)"
        )


class PolicyUnavailableError(DataPlaneError):
    """The access policy could not decide right now (e.g. the chain is unreachable)."""

    code = "policy_unavailable"
    status = 503


class FetchTruncatedError(DataPlaneError):
    """The peer's response ended before all the bytes it announced."""

    code = "fetch_truncated"

    def default_message(
        self, *, url: str = "?", expected_bytes: int = 0, received_bytes: int = 0, **_: Any
    ) -> str:
        return (
            f"truncated response from {url}: {received_bytes} of {expected_bytes} bytes "
            "(Content-Length) received"
        )


class FetchFailedError(DataPlaneError):
    """The peer could not be reached or kept failing."""

    code = "fetch_failed"

    def default_message(
        self, *, url: str = "?", attempts: int = 0, reason: str = "?", **_: Any
    ) -> str:
        return f"fetching {url} failed after {attempts} attempt(s): {reason}"


class OpeningMalformedError(DataPlaneError):
    """A peer's answer to a chunk request is not a chunk opening."""

    code = "opening_malformed"

    def default_message(self, *, url: str = "?", reason: str = "?", **_: Any) -> str:
        return f"{url} did not answer with a chunk opening: {reason}"


class FetchRefusedError(DataPlaneError):
    """The peer refused the request with an answer this client does not know."""

    code = "fetch_refused"

    def default_message(self, *, url: str = "?", status: int = 0, **_: Any) -> str:
        return f"{url} answered HTTP {status}"


# Errors a peer sends back by code, so that the client raises the same class the server did.
REMOTE_ERRORS: dict[str, type[FlexError]] = {
    cls.code: cls
    for cls in (
        AuthError,
        SignatureMissingError,
        SignatureMalformedError,
        SignatureMismatchError,
        SignatureExpiredError,
        SignatureReplayedError,
        AccessDeniedError,
        ModelTooLargeError,
        ModelIdMalformedError,
        ModelListError,
        RouteNotFoundError,
        ChunkIndexError,
        PolicyUnavailableError,
        BlobNotFoundError,
    )
}
