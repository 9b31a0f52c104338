"""Errors raised by the training engine, each with a stable ``code`` under FLEX's error root."""

from __future__ import annotations

from typing import Any

from core.errors import FlexError


class TrainingError(FlexError):
    """The training engine could not do what was asked."""

    code = "training_error"


class SpecError(TrainingError):
    """The task spec is invalid."""

    code = "spec_invalid"

    def default_message(self, *, field: str = "?", reason: str = "invalid", **_: Any) -> str:
        return f"task spec field {field!r}: {reason}"


class DatasetError(TrainingError):
    """The data does not fit the task's dataset schema."""

    code = "dataset_invalid"

    def default_message(self, *, source: str = "data", reason: str = "invalid", **_: Any) -> str:
        return f"{source}: {reason}"


class WeightsMismatchError(TrainingError):
    """Model weights do not have the layer count, shapes or dtypes expected."""

    code = "weights_mismatch"


class ModelBlobError(TrainingError):
    """A model blob was refused."""

    code = "model_blob_invalid"


class BlobTruncatedError(ModelBlobError):
    """The model blob is truncated."""

    code = "model_blob_truncated"


class BlobHeaderError(ModelBlobError):
    """The model blob has a malformed header."""

    code = "model_blob_malformed"


class BlobDtypeError(ModelBlobError):
    """Values to write are not the format's int32 fixed-point values."""

    code = "model_blob_dtype"


class BlobTooLongError(ModelBlobError):
    """The model blob has bytes after the end its header declares."""

    code = "model_blob_too_long"


class ChunkMismatchError(ModelBlobError):
    """A chunk of the model's values does not hash to its leaf: the data was changed."""

    code = "model_chunk_mismatch"

    def default_message(self, *, index: int = -1, **_: Any) -> str:
        return f"model blob chunk {index} does not match its leaf hash"


class NonFiniteWeightsError(TrainingError):
    """Weights hold NaN or infinite values, which fixed point cannot represent."""

    code = "weights_non_finite"

    def default_message(self, *, layer: int = -1, **_: Any) -> str:
        return f"layer {layer} holds NaN or infinite values; such weights are not written"


class HeaderMismatchError(ModelBlobError):
    """A model's header names another model than the one expected (see the subclasses)."""

    code = "model_header_mismatch"

    def default_message(
        self, *, field: str = "?", expected: Any = "?", actual: Any = "?", **_: Any
    ) -> str:
        return f"model header names {field} {actual}, {expected} expected"


class WrongKindError(HeaderMismatchError):
    """A global model handed in as an update, or an update where a global model belongs."""

    code = "model_wrong_kind"


class WrongTaskError(HeaderMismatchError):
    """The header names another chain, contract or task."""

    code = "model_wrong_task"


class WrongModelRoundError(HeaderMismatchError):
    """The header names another round: an old update handed in again, or one from ahead."""

    code = "model_wrong_round"


class WrongAuthorError(HeaderMismatchError):
    """The update names another trainer than the one that submitted it: a copy."""

    code = "update_wrong_author"


class WrongLayoutError(HeaderMismatchError):
    """Fixed-point scale, chunk size or tensor shapes differ from the task's model."""

    code = "model_wrong_layout"


class ModelIdMismatchError(ModelBlobError):
    """The model blob does not hash to the expected model ID."""

    code = "model_id_mismatch"

    def default_message(self, *, expected: str = "?", actual: str = "?", **_: Any) -> str:
        return f"model ID mismatch: expected {expected}, blob hashes to {actual}"


class StoreError(TrainingError):
    """The model store could not complete the operation."""

    code = "model_store_error"


class BlobNotFoundError(StoreError):
    """No blob with this model ID is in the store."""

    code = "model_not_found"

    def default_message(self, *, model_id: str = "?", **_: Any) -> str:
        return f"model {model_id} is not in the store"


class BlobTooLargeError(StoreError):
    """The blob exceeds the store's size limit."""

    code = "model_blob_too_large"

    def default_message(self, *, size: int = 0, limit: int = 0, **_: Any) -> str:
        return f"model blob of {size} bytes exceeds the store's limit of {limit} bytes"
