"""`gptedge triton`: every written config.pbtxt parses with Triton's own schema; the python model's
stream and the step model driven through Triton's sequence-batching semantics (replayed on
onnxruntime, tests/triton_emulator.py) give exactly Generator.generate's tokens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from gptedge.runtime import SamplingOptions, load
from gptedge.runtime.bundle import read_manifest, write_manifest
from gptedge.runtime.cli import main
from gptedge.runtime.errors import GenerationError, InputError, OutputExistsError
from gptedge.runtime.triton.python_model import request_options, stream_tokens
from gptedge.runtime.triton.repository import TritonConfig, write_repository
from gptedge.runtime.triton.step_client import StepClient

pytest.importorskip("tritonclient.grpc", reason="tritonclient (pip install 'gptedge[triton]') parses the configs")
from triton_emulator import BatchingTransport, SequenceBatcherEmulator, parse_config  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

PROMPTS = [[5, 17, 33, 2], [9, 1, 60, 44, 12, 7, 3]]


def with_char_tokenizer(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` with a char tokenizer of its 96 ids (printable ASCII) and a chat template."""
    shutil.copytree(bundle, out)
    (out / "tokenizer.char.json").write_text(json.dumps({"itos": [chr(c) for c in range(32, 128)]}))
    (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} "
                                             "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    manifest = read_manifest(out)
    manifest.tokenizer = type(manifest.tokenizer)(kind="char", file="tokenizer.char.json", vocab_size=96,
                                                  chat_template="chat_template.jinja")
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def char_bundle(llama_bundle, tmp_path_factory) -> Path:
    return with_char_tokenizer(llama_bundle, tmp_path_factory.mktemp("char") / "bundle")


@pytest.fixture(scope="module")
def generator(llama_bundle):
    with load(llama_bundle, backend="ort-cpu", threads=1) as gen:
        yield gen


@pytest.fixture(scope="module")
def onnx_model(llama_bundle, tmp_path_factory) -> Path:
    return write_repository(llama_bundle, TritonConfig(kind="onnx", name="step", max_batch=2, instances=2),
                            tmp_path_factory.mktemp("repo"))


# -- configs ----------------------------------------------------------------------------------------
def test_python_repository_config_parses_and_bundle_loads(char_bundle, tmp_path):
    model = write_repository(char_bundle, TritonConfig(instances=3, threads=1), tmp_path / "repo")
    config = parse_config(model / "config.pbtxt")
    assert (config.name, config.backend, config.max_batch_size) == ("gptedge", "python", 0)
    assert config.model_transaction_policy.decoupled
    assert [(g.count, g.kind) for g in config.instance_group] == [(3, mc.ModelInstanceGroup.KIND_CPU)]
    assert {i.name for i in config.input} >= {"text_input", "input_ids", "max_tokens", "stop"}
    assert all(i.optional for i in config.input)
    assert [o.name for o in config.output] == ["text_output", "token_ids", "finish_reason"]
    assert config.parameters["gptedge_threads"].string_value == "1"
    assert "TritonPythonModel" in (model / "1" / "model.py").read_text()
    with load(model / "1" / "bundle", backend="ort-cpu", threads=1) as gen:  # a complete copy
        assert gen.generate("abc", max_new_tokens=3).tokens
    linked = write_repository(char_bundle, TritonConfig(name="linked", link=True), tmp_path / "repo")
    assert (linked / "1" / "bundle").is_symlink() and (linked / "1" / "bundle").resolve() == char_bundle.resolve()
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_repository(char_bundle, TritonConfig(), tmp_path / "repo")


def test_onnx_step_config_declares_the_kv_cache_as_implicit_state(onnx_model, llama_bundle):
    arch = read_manifest(llama_bundle).architecture
    config = parse_config(onnx_model / "config.pbtxt")
    assert (config.platform, config.max_batch_size) == ("onnxruntime_onnx", 2)
    assert (onnx_model / "1" / config.default_model_filename).is_file()
    assert [i.name for i in config.input] == ["input_ids", "attention_mask", "position_ids"]
    assert list(config.output[0].dims) == [1, arch.vocab_size]  # the last-position graph
    states = config.sequence_batching.state
    assert [(s.input_name, s.output_name) for s in states][:2] == [
        ("past_key_values.0.key", "present.0.key"), ("past_key_values.0.value", "present.0.value")]
    assert len(states) == 2 * arch.num_layers
    assert all(list(s.dims) == [arch.num_kv_heads, -1, arch.head_dim] and s.data_type == mc.TYPE_FP32
               and list(s.initial_state[0].dims) == [arch.num_kv_heads, 1, arch.head_dim] and s.initial_state[0].zero_data
               for s in states)
    assert config.sequence_batching.HasField("oldest")
    assert config.instance_group[0].count == 2
    from google.protobuf import text_format

    from gptedge.runtime.triton.config import Instances, step_model_config

    fp16 = text_format.Parse(step_model_config("h", "onnxruntime_onnx", arch, "float16", None, 1, Instances(), "m.onnx",
                                               3), mc.ModelConfig())
    assert {s.data_type for s in fp16.sequence_batching.state} == {mc.TYPE_FP16}
    assert list(fp16.output[0].dims) == [-1, arch.vocab_size]  # a full-logits graph
    assert fp16.sequence_batching.oldest.max_candidate_sequences == 3


def test_tensorrt_repository_takes_the_plan_without_gptedge_header(llama_bundle, tmp_path):
    from gptedge.runtime.trt import engine_cache as ec

    bundle = tmp_path / "bundle"
    shutil.copytree(llama_bundle, bundle)
    with pytest.raises(Exception, match="gptedge build"):
        write_repository(bundle, TritonConfig(kind="tensorrt"), tmp_path / "repo")
    plan = b"not really a TensorRT plan \x00\x01"
    meta = {"key": {"role": "model_last"}, "max_batch": 4, "max_context": 64}
    ec.write_engine(ec.engine_dir(bundle) / "model_last-0123.engine", meta, plan)
    model = write_repository(bundle, TritonConfig(kind="tensorrt", name="trt"), tmp_path / "repo")
    config = parse_config(model / "config.pbtxt")
    assert (config.platform, config.max_batch_size, config.default_model_filename) == ("tensorrt_plan", 4, "model.plan")
    assert (model / "1" / "model.plan").read_bytes() == plan
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert list(config.instance_group[0].profile) == ["0", "1"]  # prefill and decode profiles, picked by shape
    with pytest.raises(InputError, match="max-batch 8"):
        write_repository(bundle, TritonConfig(kind="tensorrt", name="t2", max_batch=8), tmp_path / "repo")


def test_cli_writes_a_repository(char_bundle, tmp_path, capsys):
    assert main(["triton", str(char_bundle), "-o", str(tmp_path / "r"), "--kind", "onnx"]) == 0
    assert parse_config(tmp_path / "r" / "gptedge_onnx" / "config.pbtxt").platform == "onnxruntime_onnx"
    assert "tritonserver --model-repository" in capsys.readouterr().out
    assert main(["triton", str(char_bundle), "-o", str(tmp_path / "r"), "--kind", "onnx"]) == 9  # exists
    assert main(["triton", str(char_bundle), "-o", str(tmp_path / "r"), "--instances", "0"]) == 2


def test_step_client_does_not_import_tritonclient_until_used():
    code = ("import sys, gptedge.runtime, gptedge.runtime.triton.step_client, gptedge.runtime.triton.repository; "
            "print('tritonclient' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- the python model's logic -----------------------------------------------------------------------
def test_python_model_stream_equals_generate(char_bundle):
    with load(char_bundle, backend="ort-cpu", threads=1) as gen:
        tensors = {"text_input": np.array([b"hello"], dtype=object), "max_tokens": np.array([12], np.int32)}
        prompt, options = request_options(tensors.get)
        chunks = list(stream_tokens(gen, prompt, options))
        reference = gen.generate("hello", max_new_tokens=12)
        assert [t for c in chunks for t in c.token_ids] == reference.tokens
        assert "".join(c.text for c in chunks) == reference.text
        assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [reference.finish_reason]
        ids = {"input_ids": np.array(PROMPTS[1]), "temperature": np.array([0.8], np.float32),
               "seed": np.array([3]), "top_p": np.array([0.9], np.float32), "max_tokens": np.array([9], np.int32)}
        prompt, options = request_options(ids.get)
        sampled = [t for c in stream_tokens(gen, prompt, options) for t in c.token_ids]
        assert sampled == gen.generate(PROMPTS[1], max_new_tokens=9, temperature=0.8, seed=3, top_p=0.9).tokens
        with pytest.raises(InputError, match="no prompt"):
            request_options({}.get)
        with pytest.raises(InputError, match="not both"):
            request_options({"input_ids": np.array([1]), "text_input": np.array([b"a"], dtype=object)}.get)


# -- the step model under Triton's sequence-batching semantics ----------------------------------------
def test_emulated_step_model_equals_generate(onnx_model, llama_bundle, generator):
    client = StepClient(llama_bundle, SequenceBatcherEmulator(onnx_model))
    for prompt in PROMPTS:
        for options in (SamplingOptions(max_new_tokens=10, ignore_eos=True),
                        SamplingOptions(max_new_tokens=7, temperature=0.9, top_k=20, seed=11)):
            assert client.generate(prompt, options).tokens == generator.generate(prompt, options=options).tokens
    assert client.transport.states == {}  # every sequence ended (sequence_end freed its state)
    one = client.generate(PROMPTS[0], max_new_tokens=1)
    assert one.tokens == generator.generate(PROMPTS[0], max_new_tokens=1).tokens and client.transport.states == {}
    with pytest.raises(GenerationError, match="context"):
        client.generate(list(range(60)), max_new_tokens=4)  # 64 - 1 slot for the zero state


def test_step_client_chat_and_text_equal_the_generator(onnx_model, char_bundle):
    client = StepClient(char_bundle, SequenceBatcherEmulator(onnx_model))  # same weights as llama_bundle
    messages = [{"role": "user", "content": "hi there"}]
    with load(char_bundle, backend="ort-cpu", threads=1) as gen:
        reference = gen.chat(messages, max_new_tokens=6)
        assert client.chat(messages, max_new_tokens=6).tokens == reference.tokens
        stop = gen.generate("abc", max_new_tokens=12).text[5:7]  # char tokenizer: one character per token
        stopped = client.generate("abc", max_new_tokens=12, stop=[stop])
        assert (stopped.text, stopped.finish_reason) == (gen.generate("abc", max_new_tokens=12, stop=[stop]).text, "stop")
    assert client.transport.states == {}  # the early stop ended its sequence with one more request


def test_two_interleaved_sequences_keep_their_own_state(onnx_model, llama_bundle, generator):
    emulator = SequenceBatcherEmulator(onnx_model)
    client = StepClient(llama_bundle, emulator)
    streams = [client.stream_ids(p, max_new_tokens=8, ignore_eos=True) for p in PROMPTS]
    tokens: list[list[int]] = [[], []]
    live = [0, 1]
    while live:
        for i in list(live):  # one request of each sequence in turn
            try:
                tokens[i] += next(streams[i])
            except StopIteration:
                live.remove(i)
    for prompt, got in zip(PROMPTS, tokens):
        assert got == generator.generate(prompt, max_new_tokens=8, ignore_eos=True).tokens
    assert emulator.states == {}


def test_sequences_batched_in_one_execution_equal_generate(onnx_model, llama_bundle, generator):
    emulator = SequenceBatcherEmulator(onnx_model)
    client = StepClient(llama_bundle, BatchingTransport(emulator, batch=2))
    prompts = [[5, 17, 33, 2, 8], [9, 1, 60, 44, 12]]  # equal lengths: every step has equal shapes
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = client.generate(prompts[i], max_new_tokens=6, ignore_eos=True).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(emulator.executions) == {2}  # every step of both ran as one batch of 2
    for i, prompt in enumerate(prompts):
        assert results[i] == generator.generate(prompt, max_new_tokens=6, ignore_eos=True).tokens


# -- the python model under a real tritonserver (PyTriton's binary) -------------------------------------
def stream_request(url: str, model: str, inputs: dict[str, np.ndarray]) -> list[dict[str, object]]:
    """Send one request on a gRPC stream; return its responses ({output name: value}, or {"error": ...})."""
    import queue

    import tritonclient.grpc as grpcclient

    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    tensors = []
    for name, array in inputs.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else
                                       {np.int64: "INT64", np.int32: "INT32", np.float32: "FP32"}[array.dtype.type])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    client.async_stream_infer(model, tensors)
    out: list[dict[str, object]] = []
    try:
        while True:
            result, error = answers.get(timeout=60)
            if error is not None:
                out.append({"error": str(error)})
                return out
            out.append({"text": result.as_numpy("text_output")[0].decode(), "ids": result.as_numpy("token_ids").tolist(),
                        "finish": result.as_numpy("finish_reason")[0].decode()})
            if out[-1]["finish"]:
                return out
    finally:
        client.stop_stream()
        client.close()


def test_python_model_streams_under_tritonserver(char_bundle, tmp_path):
    from tritonserver_helper import TritonServer, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    write_repository(char_bundle, TritonConfig(threads=1, instances=1, link=True), tmp_path / "repo")
    with TritonServer(tmp_path / "repo", tmp_path) as server:
        text = {"text_input": np.array([b"hello"], dtype=object), "max_tokens": np.array([12], dtype=np.int32)}
        responses = stream_request(server.grpc_url, "gptedge", text)
        ids = {"input_ids": np.array(PROMPTS[1], dtype=np.int64), "max_tokens": np.array([5], dtype=np.int32),
               "temperature": np.array([0.7], dtype=np.float32), "seed": np.array([4], dtype=np.int64)}
        sampled = stream_request(server.grpc_url, "gptedge", ids)
        bad = stream_request(server.grpc_url, "gptedge", {"max_tokens": np.array([3], dtype=np.int32)})
    with load(char_bundle, backend="ort-cpu", threads=1) as gen:
        reference = gen.generate("hello", max_new_tokens=12)
        reference_sampled = gen.generate(PROMPTS[1], max_new_tokens=5, temperature=0.7, seed=4)
    assert len(responses) > 1  # streamed, not one answer at the end
    assert [t for r in responses for t in r["ids"]] == reference.tokens
    assert "".join(r["text"] for r in responses) == reference.text
    assert [r["finish"] for r in responses] == [""] * (len(responses) - 1) + [reference.finish_reason]
    assert [t for r in sampled for t in r["ids"]] == reference_sampled.tokens
    assert len(bad) == 1 and "no prompt" in bad[0]["error"]
