"""The engines benchmarks/peers.py races: each is ``load() -> run(prompt, new_tokens) -> (ttft_s, tok/s)``.

Every runner times the same way: TTFT = start of the call to the first new token (prefill and the
first sampling included); decode tok/s = tokens after the first / time from the first to the last.
Greedy, batch 1, EOS never stops a run (each runner checks it got exactly ``new_tokens`` tokens).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Runner = Callable[[list[int], int], tuple[float, float]]


@dataclass
class Engine:
    """One contestant: ``name`` (row label), ``model`` (config key), ``precision``, its runner."""

    name: str
    model: str
    precision: str
    run: Runner
    gptedge: bool = False


class _TokenClock:
    """A transformers streamer that timestamps every generated token (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _rates(start: float, times: list[float], new_tokens: int) -> tuple[float, float]:
    if len(times) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} tokens, got {len(times)} (EOS not disabled?)")
    decode = (new_tokens - 1) / (times[-1] - times[0]) if new_tokens > 1 else 0.0
    return times[0] - start, decode


def hf_runner(model: Any) -> Runner:
    """transformers ``generate`` (works for a torch model and for Optimum's ORTModelForCausalLM)."""
    import torch

    model.generation_config.eos_token_id = None

    def run(prompt: list[int], new_tokens: int) -> tuple[float, float]:
        clock = _TokenClock()
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock)
        return _rates(start, clock.times, new_tokens)

    return run


def transformers_engine(hf_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype="float32").eval()


def _ort_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def optimum_engines(hf_dir: Path, work: Path, threads: int) -> dict[str, Any]:
    """Optimum's ORTModelForCausalLM, fp32 and dynamic int8 (ORTQuantizer, avx512_vnni, per channel)."""
    from optimum.onnxruntime import ORTModelForCausalLM, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    fp32_dir, int8_dir = work / "optimum-fp32", work / "optimum-int8"
    if not (fp32_dir / "model.onnx").is_file():
        ORTModelForCausalLM.from_pretrained(hf_dir, export=True, use_cache=True).save_pretrained(fp32_dir)
    if not (int8_dir / "model_quantized.onnx").is_file():
        quantizer = ORTQuantizer.from_pretrained(fp32_dir, file_name="model.onnx")
        quantizer.quantize(save_dir=int8_dir,
                           quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))
        for extra in ("config.json", "generation_config.json"):
            if (fp32_dir / extra).is_file() and not (int8_dir / extra).is_file():
                (int8_dir / extra).write_bytes((fp32_dir / extra).read_bytes())
    options = _ort_options(threads)
    return {
        "fp32": ORTModelForCausalLM.from_pretrained(fp32_dir, provider="CPUExecutionProvider",
                                                    session_options=options, use_cache=True),
        "int8": ORTModelForCausalLM.from_pretrained(int8_dir, file_name="model_quantized.onnx",
                                                    provider="CPUExecutionProvider",
                                                    session_options=_ort_options(threads), use_cache=True),
    }


def genai_runner(model_dir: Path, threads: int) -> Runner:
    """onnxruntime-genai (its own C++ loop), threads set in genai_config.json's session options."""
    import onnxruntime_genai as og

    config_path = model_dir / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != threads:
        options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        config_path.write_text(json.dumps(config, indent=2))
    model = og.Model(str(model_dir))

    def run(prompt: list[int], new_tokens: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        total = len(prompt) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        start = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        times = []
        while not generator.is_done():
            generator.generate_next_token()
            times.append(time.perf_counter())
        return _rates(start, times, new_tokens)

    return run


def gptedge_runner(bundle: Path, threads: int) -> Runner:
    from gptedge.runtime import load

    generator = load(bundle, backend="ort-cpu", threads=threads)

    def run(prompt: list[int], new_tokens: int) -> tuple[float, float]:
        result = generator.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
        if len(result.tokens) != new_tokens:
            raise RuntimeError(f"gptedge gave {len(result.tokens)} tokens, expected {new_tokens}")
        return result.timings["ttft_s"], result.timings["decode_tokens_per_s"]

    return run
