"""Dataset schemas and models a task can name, with their deterministic initial weights."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from core.env import env_number
from training.errors import SpecError

if TYPE_CHECKING:
    from training.spec import TaskSpec

Weights = list[np.ndarray]


@dataclass(frozen=True)
class Schema:
    """What a task's data looks like: one sample's shape, the classes, the range of values."""

    key: str
    title: str
    input_shape: tuple[int, ...]
    num_classes: int
    value_range: tuple[float, float] = (0.0, 1.0)

    @property
    def num_features(self) -> int:
        return math.prod(self.input_shape)


@dataclass(frozen=True)
class Preset:
    """Hyper-parameters that train a catalogue model well on its bundled data with a few
    non-IID devices (tests/training/test_presets.py holds them to >= 0.90 accuracy)."""

    local_epochs: int
    batch_size: int
    learning_rate: float


@dataclass(frozen=True)
class ModelEntry:
    """A model a buyer can order: its structure is a pure function of this entry and the schema.

    ``kind`` "mlp": Flatten, one ReLU Dense layer per ``hidden`` width, softmax Dense.
    ``kind`` "cnn": per ``hidden`` width a 3x3 same-padded ReLU Conv2D and a 2x2 MaxPool,
    then Flatten and a softmax Dense.
    """

    key: str
    title: str
    schema: str
    kind: Literal["mlp", "cnn"]
    hidden: tuple[int, ...]
    preset: Preset

    def weight_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the model's weights in Keras ``get_weights()`` order, computed without TF."""
        schema = SCHEMAS[self.schema]
        shapes: list[tuple[int, ...]] = []
        if self.kind == "mlp":
            width = schema.num_features
            for units in self.hidden:
                shapes += [(width, units), (units,)]
                width = units
        else:
            *spatial, channels = schema.input_shape
            for filters in self.hidden:
                shapes += [(3, 3, channels, filters), (filters,)]
                channels = filters
                spatial = [size // 2 for size in spatial]
            width = math.prod(spatial) * channels
        shapes += [(width, schema.num_classes), (schema.num_classes,)]
        return shapes

    @property
    def param_count(self) -> int:
        return sum(math.prod(shape) for shape in self.weight_shapes())


SCHEMAS: dict[str, Schema] = {
    s.key: s
    for s in (
        Schema(
            key="digits-8x8",
            title="Handwritten digits, 8x8 grey levels scaled to [0, 1], 10 classes",
            input_shape=(8, 8, 1),
            num_classes=10,
        ),
    )
}

MODELS: dict[str, ModelEntry] = {
    m.key: m
    for m in (
        ModelEntry(
            key="digits-mlp",
            title="MLP, one hidden layer of 64 ReLU units",
            schema="digits-8x8",
            kind="mlp",
            hidden=(64,),
            preset=Preset(local_epochs=10, batch_size=16, learning_rate=0.2),
        ),
        ModelEntry(
            key="digits-cnn",
            title="Small CNN, 16 and 32 3x3 filters with max pooling",
            schema="digits-8x8",
            kind="cnn",
            hidden=(16, 32),
            preset=Preset(local_epochs=10, batch_size=16, learning_rate=0.1),
        ),
    )
}


def get_schema(*, key: str) -> Schema:
    """The schema named ``key``; raises SpecError(field="dataset") when there is none."""
    try:
        return SCHEMAS[key]
    except KeyError:
        raise SpecError(
            field="dataset", reason=f"unknown dataset schema {key!r}; known: {sorted(SCHEMAS)}"
        ) from None


def get_model(*, key: str) -> ModelEntry:
    """The catalogue entry named ``key``; raises SpecError(field="model") when there is none."""
    try:
        return MODELS[key]
    except KeyError:
        raise SpecError(
            field="model", reason=f"unknown model {key!r}; known: {sorted(MODELS)}"
        ) from None


def initial_weights(*, spec: TaskSpec) -> Weights:
    """Round-0 weights of the spec's model: Glorot-uniform kernels and zero biases from spec.seed.

    Drawn from raw PCG64 output rather than a Generator distribution or a Keras initializer,
    whose streams may change between releases: every node, whatever its numpy or TF version,
    derives the same bytes and so the same round-0 model ID.
    """
    entry = get_model(key=spec.model)
    bits = np.random.PCG64(np.random.SeedSequence([spec.seed]))
    weights: Weights = []
    for shape in entry.weight_shapes():
        if len(shape) == 1:
            weights.append(np.zeros(shape, dtype=np.float32))
            continue
        receptive = math.prod(shape[:-2])
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        # Top 53 bits of each draw give a uniform double in [0, 1), exactly, on any platform.
        unit = (bits.random_raw(math.prod(shape)) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        weights.append(((unit * 2.0 - 1.0) * limit).astype(np.float32).reshape(shape))
    return weights


_keras_lock = threading.Lock()
_keras_ready = False


def import_keras() -> Any:
    """Import Keras on the TensorFlow backend, quiet, repeatable and with a fixed thread pool.

    A round is repeatable bit for bit on hosts of one CPU family and TF build: TF's op
    determinism is on, oneDNN is off (its kernels reorder float sums by CPU and thread count),
    and each op runs on FLEX_TF_THREADS threads, 1 unless set: how Eigen splits a sum depends
    on the thread count, so a default taken from the host's cores would make two hosts differ.
    The catalogue's models are small enough that one thread loses little.
    """
    global _keras_ready
    with _keras_lock:
        if not _keras_ready:
            os.environ.setdefault("KERAS_BACKEND", "tensorflow")
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
            import tensorflow as tf

            threads = env_number("FLEX_TF_THREADS", 1, low=1, what="TensorFlow threads")
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:
                pass  # TF was already initialised by the host process; keep its settings.
            tf.config.experimental.enable_op_determinism()
            _keras_ready = True
    import keras

    return keras


def build_model(*, spec: TaskSpec) -> Any:
    """A Keras model of the spec's structure holding the spec's initial weights (uncompiled)."""
    entry = get_model(key=spec.model)
    schema = SCHEMAS[entry.schema]
    keras = import_keras()
    layers = keras.layers
    stack: list[Any] = [keras.Input(shape=schema.input_shape)]
    if entry.kind == "mlp":
        stack.append(layers.Flatten())
        stack += [layers.Dense(units, activation="relu") for units in entry.hidden]
    else:
        for filters in entry.hidden:
            stack += [
                layers.Conv2D(filters, 3, padding="same", activation="relu"),
                layers.MaxPooling2D(2),
            ]
        stack.append(layers.Flatten())
    stack.append(layers.Dense(schema.num_classes, activation="softmax"))
    model = keras.Sequential(stack, name=entry.key.replace("-", "_"))
    model.set_weights(initial_weights(spec=spec))
    return model


_compiled = threading.local()


def compiled_model(*, spec: TaskSpec) -> Any:
    """A compiled Keras model of the spec's structure, one per model and thread.

    Building and tracing a model costs far more than a round on a small partition, so each
    thread keeps one per catalogue model. Its weights and learning rate are whatever the last
    caller left: callers set what they use (the rate is a variable, so no retrace).
    """
    cache: dict[str, Any] = _compiled.__dict__.setdefault("models", {})
    if spec.model not in cache:
        keras = import_keras()
        model = build_model(spec=spec)
        # Plain SGD keeps no state between batches that a round would carry into the next.
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=spec.learning_rate),
            loss="sparse_categorical_crossentropy",
        )
        cache[spec.model] = model
    return cache[spec.model]


def minibatch_sgd(*, spec: TaskSpec) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """The spec's compiled model (compiled_model) trained in one call: ``(x, y, batches)``
    takes one optimizer step on each batch in turn, batch k being the samples
    ``batches[k]`` names (rows of indexes into ``x`` and ``y``; a shorter last batch of an
    epoch is padded with -1). One per model and thread, traced once per partition size (a
    device's one size keeps its exact shapes) and, after a second size, once for any.

    Each step is the model's own train_step, through the same kernels as train_on_batch on
    that batch: the weights are those, bit for bit. A round of a small model on a small
    partition is dozens of tiny batches, and a Python call into Keras per batch costs more
    than the batch's arithmetic; here the loop runs inside the graph and the round pays
    that overhead once.
    """
    cache: dict[str, Any] = _compiled.__dict__.setdefault("sgd", {})
    if spec.model not in cache:
        import tensorflow as tf

        model = compiled_model(spec=spec)

        @tf.function(reduce_retracing=True)
        def steps(x: Any, y: Any, batches: Any) -> None:
            for metric in model.metrics:
                metric.reset_state()  # unread: kept from summing every round ever trained
            for k in tf.range(tf.shape(batches)[0]):
                chosen = tf.boolean_mask(batches[k], batches[k] >= 0)
                model.train_step((tf.gather(x, chosen), tf.gather(y, chosen)))

        def run(x: np.ndarray, y: np.ndarray, batches: np.ndarray) -> None:
            steps(tf.constant(x), tf.constant(y), tf.constant(batches, dtype=tf.int32))

        cache[spec.model] = run
    return cache[spec.model]


def forward(
    *, spec: TaskSpec
) -> Callable[[Sequence[Sequence[np.ndarray]], np.ndarray], np.ndarray]:
    """The spec's model as a function of its weights: ``(weight_sets, x)`` gives the model's
    outputs on the batch ``x`` for each set of weights, stacked (sets first), the weights left
    out of any model. One per model and thread, traced once.

    Evaluating weights by setting them into a model first costs more than the forward pass
    on a small test set (Keras assigns variable by variable), and a round's scoring
    evaluates dozens of aggregates. The sets run one after another inside one call
    (tf.map_fn), through the same kernels as one model holding each set: the outputs are
    those of that model, bit for bit, and one call's overhead is paid for all of them.
    """
    cache: dict[str, Any] = _compiled.__dict__.setdefault("forwards", {})
    if spec.model not in cache:
        import tensorflow as tf

        model = compiled_model(spec=spec)
        at = {id(v): i for i, v in enumerate(model.weights)}  # get_weights()'s order
        trainable = [at[id(v)] for v in model.trainable_variables]
        fixed = [at[id(v)] for v in model.non_trainable_variables]

        def one(weights: list[Any], x: Any) -> Any:
            out, _ = model.stateless_call(
                [weights[i] for i in trainable], [weights[i] for i in fixed], x, training=False
            )
            return out

        @tf.function(reduce_retracing=True)
        def outputs(stacked: list[Any], x: Any) -> Any:
            return tf.map_fn(lambda w: one(w, x), stacked, fn_output_signature=tf.float32)

        def run(weight_sets: Sequence[Sequence[np.ndarray]], x: np.ndarray) -> np.ndarray:
            stacked = [
                tf.constant(np.stack([s[i] for s in weight_sets]), dtype=tf.float32)
                for i in range(len(weight_sets[0]))
            ]
            return outputs(stacked, x).numpy()

        cache[spec.model] = run
    return cache[spec.model]
