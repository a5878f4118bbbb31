"""``config.pbtxt`` text for the models of a Triton repository (Triton's ``ModelConfig`` schema).

Written as protobuf text by hand, not through ``model_config_pb2``: writing a repository must not
need ``tritonclient`` (the tests parse every config with Triton's own schema instead).

The step models keep the KV cache in Triton with **implicit state**: each ``past_key_values.*``
input is fed from the previous request's ``present.*`` output of the same sequence. A sequence
starts from a zero state of ONE cache slot (``initial_state`` dims ``[kv_heads, 1, head_dim]``):
Triton's documented initial states have fixed, non-empty dims, so instead of an empty cache the
client masks that zero slot out (attention mask column 0 is 0). Position ids are explicit inputs,
so the slot shifts nothing; a sequence holds at most ``max_context - 1`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gptedge.runtime import contract
from gptedge.runtime.bundle import Architecture

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
# What one streamed response of the python model holds, and what a request may set (all optional
# except a prompt: text_input or input_ids). Names follow Triton's vLLM/TensorRT-LLM backends.
PYTHON_INPUTS = (("text_input", "TYPE_STRING", (1,)), ("input_ids", "TYPE_INT64", (-1,)),
                 ("max_tokens", "TYPE_INT32", (1,)), ("temperature", "TYPE_FP32", (1,)),
                 ("top_k", "TYPE_INT32", (1,)), ("top_p", "TYPE_FP32", (1,)), ("seed", "TYPE_INT64", (1,)),
                 ("stop", "TYPE_STRING", (-1,)), ("ignore_eos", "TYPE_BOOL", (1,)))
PYTHON_OUTPUTS = (("text_output", "TYPE_STRING", (1,)), ("token_ids", "TYPE_INT64", (-1,)),
                  ("finish_reason", "TYPE_STRING", (1,)))
SINK_SLOTS = 1  # zero cache slots every sequence starts with (see the module doc)
IDLE_MICROSECONDS = 60_000_000  # a sequence idle this long is dropped by Triton (client gone)


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensor(name: str, dtype: str, dims: Sequence[int], optional: bool = False) -> str:
    extra = " optional: true" if optional else ""
    return f"  {{ name: {_q(name)} data_type: {dtype} dims: {_dims(dims)}{extra} }}"


def _tensors(key: str, items: Sequence[str]) -> str:
    return f"{key} [\n" + ",\n".join(items) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: {_q(k)} value {{ string_value: {_q(v)} }} }}\n"
                   for k, v in sorted(params.items()))


@dataclass(frozen=True)
class Instances:
    """``instance_group``: ``count`` copies of the model on ``kind`` (``KIND_CPU``/``KIND_GPU``);
    ``profiles``: TensorRT optimization profiles the instances may pick from (by input shape)."""

    count: int = 1
    kind: str = "KIND_CPU"
    profiles: tuple[int, ...] = ()

    def text(self) -> str:
        profile = "".join(f" profile: {_q(str(p))}" for p in self.profiles)
        return f"instance_group [\n  {{ count: {self.count} kind: {self.kind}{profile} }}\n]\n"


def python_model_config(name: str, instances: Instances, params: dict[str, str]) -> str:
    """The decoupled python-backend model: one request in, a stream of responses out (the last one
    carries ``finish_reason``). No Triton batching: each instance runs one generation at a time."""
    inputs = [_tensor(n, t, d, optional=True) for n, t, d in PYTHON_INPUTS]
    outputs = [_tensor(n, t, d) for n, t, d in PYTHON_OUTPUTS]
    return (f"name: {_q(name)}\nbackend: \"python\"\nmax_batch_size: 0\n"
            "model_transaction_policy { decoupled: true }\n"
            + _tensors("input", inputs) + _tensors("output", outputs) + instances.text() + _parameters(params))


def step_model_config(name: str, platform: str, arch: Architecture, kv_dtype: str, logits_rows: int | None,
                      max_batch: int, instances: Instances, model_filename: str, max_sequences: int) -> str:
    """A step model (``onnxruntime_onnx`` or ``tensorrt_plan``) under the sequence batcher with the KV
    cache as implicit state. ``logits_rows``: 1 for a last-position graph (``logits [B, 1, V]``),
    None for full logits ``[B, S, V]``. ``max_batch``: sequences Triton may run in one execution
    (it only batches requests whose input shapes are equal, i.e. sequences at the same length);
    ``max_sequences``: sequences an instance keeps state for (more wait in Triton's backlog)."""
    kv = TRITON_DTYPES[kv_dtype]
    inputs = [_tensor(n, "TYPE_INT64", (-1,)) for n in (contract.INPUT_IDS, contract.ATTENTION_MASK,
                                                         contract.POSITION_IDS)]
    rows = -1 if logits_rows is None else logits_rows
    outputs = [_tensor(contract.LOGITS, "TYPE_FP32", (rows, arch.vocab_size))]
    states = []
    for past, present in zip(contract.past_names(arch.num_layers), contract.present_names(arch.num_layers)):
        states.append(
            f"    {{ input_name: {_q(past)} output_name: {_q(present)} data_type: {kv}\n"
            f"      dims: {_dims((arch.num_kv_heads, -1, arch.head_dim))}\n"
            f"      initial_state {{ name: \"empty\" data_type: {kv} "
            f"dims: {_dims((arch.num_kv_heads, SINK_SLOTS, arch.head_dim))} zero_data: true }} }}")
    batching = (f"sequence_batching {{\n  max_sequence_idle_microseconds: {IDLE_MICROSECONDS}\n"
                f"  oldest {{ max_candidate_sequences: {max_sequences} }}\n"
                "  state [\n" + ",\n".join(states) + "\n  ]\n}\n")
    return (f"name: {_q(name)}\nplatform: {_q(platform)}\nmax_batch_size: {max_batch}\n"
            f"default_model_filename: {_q(model_filename)}\n"
            + _tensors("input", inputs) + _tensors("output", outputs) + batching + instances.text())
