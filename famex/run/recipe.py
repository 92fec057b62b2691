"""`famex run RECIPE.toml`: one file declares a family; the stages run in dependency order.

A recipe is a TOML file whose sections are the stages' own configs (the same keys as the
stages' command-line options, with underscores), plus the names that tie them together:

    [run]        name, out (default runs/<name>), minutes (the expected duration, printed at the start)
    [teacher]    model = "default" | a GGUF file | a model directory
    [data]       famex data options (demo = true builds the offline demo corpus)
    [logits]     famex logits options; val = true also stores the teacher over the val split
    [distill]    famex distill options shared by every student
    [[student]]  name, preset (or model = DIR, or prune = {famex prune options}: cut from the teacher),
                 objective = "kd" | "ce", and any famex distill option
    [sft] [dpo]  students = [...], data = "demo" | [paths], and their stage options
    [quantize]   options shared by every variant; [quantize.rtn] / [quantize.gptq] / [quantize.qad]
                 options per method; [[quantize.matrix]] entries: models = ["teacher", "s", "m:instruct"],
                 formats = [...], methods = ["rtn", "gptq", "qad"], norm_fusion = [false, true] and
                 options for their variants (one matrix may also be written inline in [quantize])
    [export]     which variants go to their runtime (methods, formats, norm_fusion, models filters),
                 targets = {format = "mlx" | "compressed-tensors"} (default: MLX for affine integer
                 formats, compressed-tensors for FP8 / NVFP4 / symmetric integers), eval = true to
                 evaluate the exports too, and famex export options
    [eval]       famex eval options (tasks, shots, limit, ...)
    [report]     famex report options

Each stage writes ``<out>/<stage>-<variant>/``; a stage whose meta.json is complete with the same
config and inputs is skipped, an interrupted one resumes (every stage implements both), and the
run ends with the report. ``--dry-run`` prints the plan, the FLOPs of every stage and the size of
the logit store without running anything.

What this module does not do: any stage's work; it builds configs and calls the stages' ``run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import importlib.util
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from famex.config import config_from_dict, load_toml
from famex.errors import FamexError
from famex.utils import log

# The stage modules, in pipeline order: each exposes CONFIG (its config dataclass) and run(cfg).
STAGE_MODULES: dict[str, str] = {
    "data": "famex.data.prepare",
    "logits": "famex.teacher.generate",
    "prune": "famex.prune.stage",
    "distill": "famex.distill.train",
    "sft": "famex.posttrain.sft",
    "dpo": "famex.posttrain.dpo",
    "quantize": "famex.quant.stage",
    "export": "famex.export.stage",
    "eval": "famex.eval.stage",
    "report": "famex.report.stage",
}
SECTIONS = ("run", "teacher", "data", "logits", "distill", "student", "chat", "sft", "dpo", "quantize", "export", "eval",
            "report")


@dataclass
class Node:
    """One stage run of the plan."""

    name: str  # directory name under the run, e.g. "distill-s"
    stage: str  # key of STAGE_MODULES
    config: dict[str, Any]  # the stage config's fields (out included)
    deps: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # for the plan and the cost table

    def available(self) -> bool:
        return stage_ready(self.stage)


@dataclass
class Recipe:
    path: Path
    raw: dict[str, Any]
    name: str
    out: Path
    minutes: float | None
    nodes: list[Node]


def _module(stage: str):
    return importlib.import_module(STAGE_MODULES[stage])


def stage_ready(stage: str) -> bool:
    """Whether this famex has the stage (its module exists and follows the CONFIG / run interface)."""
    if importlib.util.find_spec(STAGE_MODULES[stage]) is None:
        return False
    module = _module(stage)
    return hasattr(module, "CONFIG") and hasattr(module, "run")


def _check(section: str, data: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(allowed))}"
            raise FamexError(f"{where}: unknown key [{section}].{key}{hint}")


def _validate_stage_config(stage: str, config: dict[str, Any], where: str) -> None:
    """Build the stage's config dataclass now, so a bad key or value fails before any work."""
    if not stage_ready(stage):
        return
    cls = _module(stage).CONFIG
    config_from_dict(cls, config, where)


def load_recipe(path: str | Path, out: str | None = None) -> Recipe:
    """Parse and check a recipe; returns the plan. Every error names the field at fault."""
    path = Path(path)
    raw = load_toml(path)
    where = str(path)
    for section in raw:
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else f"; sections: {', '.join(SECTIONS)}"
            raise FamexError(f"{where}: unknown section [{section}]{hint}")
    run = raw.get("run", {})
    _check("run", run, {"name", "out", "minutes", "description"}, where)
    name = run.get("name") or path.stem
    root = Path(out or run.get("out") or f"runs/{name}")
    teacher = raw.get("teacher")
    if not teacher or "model" not in teacher:
        raise FamexError(f"{where}: [teacher] model is missing — name the teacher (\"default\", a .gguf file or a model directory)")
    _check("teacher", teacher, {"model", "pretraining_tokens", "preset"}, where)
    nodes: list[Node] = []
    by_name: dict[str, Node] = {}

    def add(node: Node) -> Node:
        if node.name in by_name:
            raise FamexError(f"{where}: two stages would write {root / node.name}; give the students/variants distinct names")
        nodes.append(node)
        by_name[node.name] = node
        _validate_stage_config(node.stage, node.config, f"{where} [{node.stage}] ({node.name})")
        return node

    # -- the teacher: a GGUF file is dequantized once into a plain HF directory (`famex prune` with
    # nothing removed: the same weights), which every later stage loads in a fraction of a second
    # instead of dequantizing the GGUF again (~15 s for the 135M default on 2 cores).
    # A run an older famex began on the GGUF itself keeps reading it, so that its finished stages still count.
    teacher_model, teacher_deps = str(teacher["model"]), []
    if _is_gguf(teacher_model) and not _begun_on(root, teacher_model):
        tnode = add(Node("teacher", "prune", {"teacher": teacher_model, "out": str(root / "teacher")}, [],
                         {"converts": teacher_model}))
        teacher_model, teacher_deps = tnode.config["out"], [tnode.name]

    # -- data
    data_cfg = dict(raw.get("data", {}))
    if "out" in data_cfg:
        raise FamexError(f"{where}: [data] out is set by the run (it writes {root / 'data'}); remove it")
    data_cfg.setdefault("tokenizer", teacher_model)  # students and stores share the teacher's tokenizer
    students = raw.get("student", [])
    if isinstance(students, dict):
        students = [students]
    _check_vocab(students, raw.get("chat", {}), teacher, data_cfg, where)
    data = add(Node("data", "data", {**data_cfg, "out": str(root / "data")}, list(teacher_deps)))
    data_dir = data.config["out"]

    # -- logits (train, and val for validation KL)
    logits_cfg = dict(raw.get("logits", {}))
    want_val_store = bool(logits_cfg.pop("val", False))
    store_nodes: dict[str, Node] = {}
    for split in ["train"] + (["val"] if want_val_store else []):
        store_nodes[split] = add(Node(f"logits-{split}", "logits", {
            **logits_cfg, "teacher": teacher_model, "data": data_dir, "split": split,
            "out": str(root / f"logits-{split}"),
        }, deps=["data", *teacher_deps]))

    # -- students
    shared = dict(raw.get("distill", {}))
    for key in ("student", "data", "logits", "out"):
        if key in shared:
            raise FamexError(f"{where}: [distill] {key} is set per [[student]] by the run; remove it")
    student_nodes: dict[str, Node] = {}
    prune_nodes: dict[str, Node] = {}  # one prune stage per distinct set of options (a CE twin shares it)
    widths: dict[str, dict[str, int]] = {}  # a pruned student's hidden / MLP widths, known before it exists
    for i, st in enumerate(students):
        st = dict(st)
        sname = st.pop("name", None)
        if not sname:
            raise FamexError(f"{where}: [[student]] #{i + 1} has no name")
        if sname == "teacher" or ":" in sname:
            raise FamexError(f"{where}: [[student]] {sname!r}: \"teacher\" names the teacher and \":\" marks NAME:instruct; "
                             "choose another name")
        prune = st.pop("prune", None)
        preset = st.pop("preset", None) or st.pop("model", None)
        if prune is not None:
            # Initialised from the teacher (famex prune): the pruned directory is the student to distil.
            if preset or not isinstance(prune, dict):
                raise FamexError(f"{where}: [[student]] {sname!r}: prune = {{layers = N, ...}} (the famex prune options) "
                                 "replaces preset / model; give one of them")
            key = repr(sorted(prune.items()))
            if key not in prune_nodes:
                prune_nodes[key] = add(Node(f"prune-{sname}", "prune", {**prune, "teacher": teacher_model, "data": data_dir,
                                                                        "out": str(root / f"prune-{sname}")},
                                            ["data", *teacher_deps], {"student": sname}))
            pnode = prune_nodes[key]
            preset = pnode.config["out"]
            widths[sname] = {k: prune[k] for k in ("hidden", "mlp") if isinstance(prune.get(k), int)}
        if not preset:
            raise FamexError(f"{where}: [[student]] {sname!r} needs preset = NAME (famex info --list), model = DIR "
                             "or prune = {...} (cut from the teacher)")
        objective = st.pop("objective", "kd")
        if objective not in ("kd", "ce"):
            raise FamexError(f"{where}: [[student]] {sname!r} objective must be \"kd\" or \"ce\", not {objective!r}")
        config = {**shared, **st, "student": preset, "data": data_dir, "out": str(root / f"distill-{sname}")}
        deps = ["data"] + ([pnode.name] if prune is not None else [])
        if objective == "kd":
            config["logits"] = store_nodes["train"].config["out"]
            deps.append("logits-train")
            if "val" in store_nodes:
                config["val_logits"] = store_nodes["val"].config["out"]
                deps.append("logits-val")
        else:
            config["logits"] = "none"
            # The twin visits the chunks in the KD students' order, the train store's (famex logits --seed);
            # set only where that differs from its own seed, so that runs made before order_seed stay complete.
            store_seed = store_nodes["train"].config.get("seed", 0) if "train" in store_nodes else None
            if store_seed is not None and "order_seed" not in config and store_seed != config.get("seed", 0):
                config["order_seed"] = store_seed
        student_nodes[sname] = add(Node(f"distill-{sname}", "distill", config, deps, {"student": sname, "objective": objective}))

    # -- post-training: chat data (+ the instruct teacher's logits over it), SFT, then DPO
    instruct: dict[str, Node] = {}
    chat_nodes: dict[str, Node] = {}
    if "sft" in raw or "dpo" in raw:
        chat_cfg = dict(raw.get("chat", {}))
        chat_logits = chat_cfg.pop("logits", False)
        chat_top_k = chat_cfg.pop("top_k", logits_cfg.get("top_k", 64))
        # The instruct teacher (the paper: Apertus-8B-Instruct) whose logits over the chat data
        # SFT may distil from and instruct QAD does; default: [teacher] model.
        chat_teacher = chat_cfg.pop("teacher", teacher_model)
        chat_deps = list(teacher_deps) if chat_teacher == teacher_model else []
        if not chat_cfg.get("demo_chat") and not chat_cfg.get("input"):
            raise FamexError(f"{where}: [sft]/[dpo] need chat data: set [chat] demo_chat = true or [chat] input = [CHAT.jsonl...]")
        chat_cfg.setdefault("tokenizer", chat_teacher)
        if not chat_cfg.get("demo_chat"):
            chat_cfg["chat"] = True
        chat_nodes["data"] = add(Node("data-chat", "data", {**chat_cfg, "out": str(root / "data-chat")}, list(chat_deps)))
        if chat_logits:
            chat_nodes["logits"] = add(Node("logits-chat", "logits", {
                **{k: v for k, v in logits_cfg.items() if k not in ("top_k",)}, "top_k": chat_top_k,
                "teacher": chat_teacher, "data": chat_nodes["data"].config["out"], "split": "train",
                "out": str(root / "logits-chat")}, deps=["data-chat", *chat_deps]))
        sft_cfg = dict(raw.get("sft", {}))
        sft_students = sft_cfg.pop("students", list(student_nodes)[:1])
        dpo_cfg = dict(raw.get("dpo", {}))
        dpo_students = dpo_cfg.pop("students", sft_students)
        for sname in sft_students:
            if sname not in student_nodes:
                raise FamexError(f"{where}: [sft] students names {sname!r}, which is no [[student]] (have {', '.join(student_nodes)})")
            deps = [f"distill-{sname}", "data-chat"]
            config = {**sft_cfg, "model": student_nodes[sname].config["out"], "data": chat_nodes["data"].config["out"],
                      "out": str(root / f"sft-{sname}")}
            if "logits" in chat_nodes:
                config["logits"] = chat_nodes["logits"].config["out"]
                deps.append("logits-chat")
            instruct[sname] = add(Node(f"sft-{sname}", "sft", config, deps, {"student": sname}))
        if "dpo" in raw:
            for sname in dpo_students:
                if sname not in instruct:
                    raise FamexError(f"{where}: [dpo] students names {sname!r}, which has no [sft] stage")
                config = {**dpo_cfg, "model": instruct[sname].config["out"],
                          "data": dpo_cfg.get("data") or [chat_nodes["data"].config["out"]],
                          "out": str(root / f"dpo-{sname}")}
                instruct[sname] = add(Node(f"dpo-{sname}", "dpo", config, [f"sft-{sname}", "data-chat"], {"student": sname}))

    # -- quantization matrix (formats × methods × norm fusion per model), then exports
    # The teacher is a family member to quantize too (the paper releases Apertus-8B in FP8 / NVFP4 /
    # INT4): "teacher" in a matrix's models, QAD's teacher being the BF16 model itself (its store).
    sources = {"teacher": (by_name.get("teacher") or Node("teacher", "teacher", {"out": teacher_model}), "base")}
    sources.update({name: (node, "base") for name, node in student_nodes.items()})
    sources.update({f"{name}:instruct": (node, "instruct") for name, node in instruct.items()})
    stores = {"base": (data_dir, store_nodes.get("train"), store_nodes.get("val")),
              "instruct": (chat_nodes["data"].config["out"] if chat_nodes else None, chat_nodes.get("logits"), None)}
    widths.update({f"{name}:instruct": widths[name] for name in instruct if name in widths})
    quant_nodes = _quantize_nodes(raw.get("quantize"), sources, stores, root, add, where, widths)
    export_nodes = _export_nodes(raw.get("export"), quant_nodes, root, add, where)

    # -- evaluation: every model of the family; quantized variants against their BF16 source
    if "eval" in raw:
        ev = dict(raw["eval"])
        fewshot_for = ev.pop("fewshot", "instruct")
        if fewshot_for not in ("all", "instruct", "none"):
            raise FamexError(f"{where}: [eval] fewshot must be \"all\", \"instruct\" or \"none\", not {fewshot_for!r}")
        with_teacher = ev.pop("teacher", True)
        tasks = ev.pop("tasks", [])
        for key in ("model", "out", "data", "reference", "name"):
            if key in ev:
                raise FamexError(f"{where}: [eval] {key} is set per model by the run; remove it")
        evals: dict[str, Node] = {}

        def add_eval(target: Node | None, model: str, kind: str, deps: list[str], reference: str = "") -> None:
            name = f"eval-{target.name if target else 'teacher'}"
            config = {**ev, "model": model, "data": data_dir, "out": str(root / name)}
            if fewshot_for == "all" or kind in ("teacher", "instruct") and fewshot_for != "none":
                config["tasks"] = tasks
            if reference:
                config["reference"] = reference
            if target is None or target.info.get("source") == "teacher":
                config["name"] = "teacher"
            if target is None:
                config.setdefault("tokenizer", str(Path(data_dir) / "tokenizer"))
            evals[name] = add(Node(name, "eval", config, deps, {"kind": kind}))

        if with_teacher:
            add_eval(None, teacher_model, "teacher", ["data", *teacher_deps])
        for node in list(nodes):
            if node.stage == "distill":
                add_eval(node, node.config["out"], "base", [node.name])
            elif node.stage in ("sft", "dpo") and instruct.get(node.info["student"]) is node:
                add_eval(node, node.config["out"], "instruct", [node.name])
        # Quantized variants (and, when asked, their exports) against their BF16 source's evaluation.
        for node in quant_nodes + [n for n in export_nodes if n.info.get("eval")]:
            ref = f"eval-{node.info['source']}"
            if ref not in evals:
                continue
            add_eval(node, node.config["out"], node.info["kind"], [node.name, ref], reference=evals[ref].config["out"])

    # -- report: last, over everything above
    report_cfg = dict(raw.get("report", {}))
    for key in ("run_dir", "out"):
        if key in report_cfg:
            raise FamexError(f"{where}: [report] {key} is set by the run; remove it")
    add(Node("report", "report", {**report_cfg, "run_dir": str(root), "out": str(root / "report")},
             deps=[n.name for n in nodes]))

    return Recipe(path, raw, name, root, run.get("minutes"), nodes)


def _is_gguf(spec: str) -> bool:
    return spec == "default" or spec.endswith(".gguf")


def _begun_on(root: Path, teacher: str) -> bool:
    """Whether the run's data stage was made with the (GGUF) teacher itself as its tokenizer: a run begun
    before famex dequantized GGUF teachers into ``teacher/``."""
    from famex.stage import read_meta

    try:
        meta = read_meta(root / "data")
    except FamexError:
        return False
    return bool(meta) and (meta.get("config") or {}).get("tokenizer") == teacher and not (root / "teacher").exists()


def _check_vocab(students: list[dict[str, Any]], chat: dict[str, Any], teacher: dict[str, Any],
                 data_cfg: dict[str, Any], where: str) -> None:
    """Refuse, before any work, models and tokenizers whose vocabulary the teacher's logits cannot cover.

    Checked where the files are here (a teacher that is only named, e.g. for a dry run of the
    paper's recipe, is not): the data's tokenizer must fit the teacher's vocabulary, and students
    given as model directories and the chat teacher must have exactly the teacher's.
    """
    from famex.eval.costdoc import model_info_cached

    def here(path: str) -> bool:
        return path == "default" or Path(path).exists()

    def vocab_of(path: str, field: str) -> int | None:
        if not here(path):
            return None
        try:
            return int(model_info_cached(path)["vocab_size"])
        except (OSError, ValueError, KeyError) as e:
            raise FamexError(f"{where}: {field} {path}: cannot read its config ({e})") from None

    spec = str(teacher["model"])
    vocab = vocab_of(spec, "[teacher] model")
    if vocab is None:
        return
    tok = str(data_cfg.get("tokenizer", spec))
    if tok != spec and here(tok):
        from famex.models import load_tokenizer

        n = len(load_tokenizer(tok))
        if n > vocab:
            raise FamexError(f"{where}: [data] tokenizer {tok} has {n:,} tokens but the teacher {spec} scores only {vocab:,}: "
                             "the corpus must be tokenized with the teacher's tokenizer (remove [data] tokenizer)")
    for st in students:
        if "model" in st:
            v = vocab_of(str(st["model"]), f"[[student]] {st.get('name')!r} model")
            if v is not None and v != vocab:
                raise FamexError(f"{where}: [[student]] {st.get('name')!r} model {st['model']} has a vocabulary of {v:,}, the "
                                 f"teacher {spec} {vocab:,}: a student must share the teacher's vocabulary (use preset = NAME "
                                 "to build one at the teacher's)")
    if chat.get("teacher"):
        v = vocab_of(str(chat["teacher"]), "[chat] teacher")
        if v is not None and v != vocab:
            raise FamexError(f"{where}: [chat] teacher {chat['teacher']} has a vocabulary of {v:,}, the [teacher] model {vocab:,}: "
                             "the instruct teacher must share the students' vocabulary")


# ---------------------------------------------------------------- quantization and export sections

QUANT_MATRIX_KEYS = {"models", "formats", "methods", "norm_fusion"}
EXPORT_KEYS = {"methods", "norm_fusion", "models", "formats", "targets", "eval"}


def default_target(fmt_name: str) -> str:
    """Where a format is deployed: FP8 / NVFP4 and symmetric integers to vLLM, MLX's affine integers to mlx-lm."""
    from famex.quant.formats import parse_format

    fmt = parse_format(fmt_name)
    return "mlx" if fmt.kind == "int" and not fmt.symmetric else "compressed-tensors"


def _as_list(value: Any, key: str, where: str) -> list:
    if isinstance(value, (str, bool)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise FamexError(f"{where}: {key} must be a non-empty list, not {value!r}")
    return value


def _quantize_nodes(section: dict[str, Any] | None, sources: dict[str, tuple[Node, str]],
                    stores: dict[str, tuple], root: Path, add: Callable[[Node], Node], where: str,
                    widths: dict[str, dict[str, int]] | None = None) -> list[Node]:
    """Expand [quantize]: shared options, per-method tables and [[quantize.matrix]] entries into nodes.

    A matrix entry names ``models`` (a student for its distilled model, ``NAME:instruct`` for its
    post-trained one, ``teacher`` for the teacher itself), ``formats``, ``methods`` and ``norm_fusion`` (a list of booleans), plus any
    `famex quantize` option for its nodes. GPTQ calibrates on the model's training data (the chat
    data for instruct models); QAD distils from the store over it (the instruct teacher's logits over
    the chat data for instruct models, as the paper does).
    ``widths`` holds pruned students' hidden / MLP widths, so that a group size that does not divide
    them is refused here rather than after hours of earlier stages.
    """
    if not section:
        return []
    from famex.quant.formats import parse_format
    from famex.quant.stage import needs_calibration

    section = dict(section)
    per_method = {m: dict(section.pop(m)) for m in ("rtn", "gptq", "qad") if isinstance(section.get(m), dict)}
    matrix = section.pop("matrix", None)
    if matrix is None:  # a single matrix written inline in [quantize]
        matrix = [{k: section.pop(k) for k in list(section) if k in QUANT_MATRIX_KEYS}]
    if isinstance(matrix, dict):
        matrix = [matrix]
    for key in ("model", "format", "method", "norm_fusion", "out", "calib", "data", "logits", "val_logits"):
        if key in section:
            raise FamexError(f"{where}: [quantize] {key} is set per variant by the run; use the [[quantize.matrix]] lists "
                             "(models, formats, methods, norm_fusion)")
    nodes: list[Node] = []
    made: dict[tuple, Node] = {}  # (model, format, method, norm fusion) -> its node: a GPTQ one is a start QAD may reuse
    for i, entry in enumerate(matrix, 1):
        entry = dict(entry)
        here = f"{where}: [[quantize.matrix]] #{i}"
        missing = [k for k in ("models", "formats", "methods") if k not in entry]
        if missing:
            raise FamexError(f"{here} needs {', '.join(missing)} (and optionally norm_fusion = [false, true])")
        models = _as_list(entry.pop("models"), "models", here)
        formats = _as_list(entry.pop("formats"), "formats", here)
        methods = _as_list(entry.pop("methods"), "methods", here)
        fusions = _as_list(entry.pop("norm_fusion", [False]), "norm_fusion", here)
        for name in models:
            if name not in sources:
                raise FamexError(f"{here}: models names {name!r}, which is no model of this recipe "
                                 f"(have {', '.join(sources)}; NAME:instruct is a student after [sft]/[dpo])")
        for fmt in formats:
            try:
                parse_format(fmt)
            except FamexError as e:
                raise FamexError(f"{here}: formats: {e}") from None
        for method in methods:
            if method not in ("rtn", "gptq", "qad"):
                raise FamexError(f"{here}: methods must be among rtn, gptq, qad, not {method!r}")
        for nf in fusions:
            if not isinstance(nf, bool):
                raise FamexError(f"{here}: norm_fusion must list booleans (false, true), not {nf!r}")
        for name, fmt in itertools.product(models, formats):
            group = parse_format(fmt).group_size
            for what, width in (widths or {}).get(name, {}).items():
                if group and width % group:
                    fits = next((f"{fmt.split('-')[0]}-g{g}" for g in (128, 64, 32) if width % g == 0), None)
                    raise FamexError(f"{here}: {name!r} is pruned to {what} = {width}, which is no multiple of the group size "
                                     f"{group} of {fmt}; use " + (f"{fits} or " if fits else "") + "a per-channel format "
                                     "(-ch), or prune to a width that is a multiple of the group")
        for name, fmt, method, nf in itertools.product(models, formats, methods, fusions):
            source, kind = sources[name]
            data, store, val_store = stores[kind]
            vname = f"quantize-{name.replace(':', '-')}-{fmt}-{method}" + ("-nf" if nf else "")
            config = {**section, **per_method.get(method, {}), **entry, "model": source.config["out"],
                      "format": fmt, "method": method, "norm_fusion": nf, "out": str(root / vname)}
            deps = [source.name] if source.stage != "teacher" else []
            if method == "qad":
                if store is None:
                    what = "[logits]" if kind == "base" else "[chat] logits = true"
                    raise FamexError(f"{here}: QAD of {name!r} distils from the teacher's stored logits over its "
                                     f"training data; this recipe has none ({what})")
                config.update(data=data, logits=store.config["out"])
                # QAD keeps the global batch the model was trained with; written here so that the
                # plan's cost table counts its tokens too.
                if source.config.get("global_batch"):
                    config.setdefault("global_batch", source.config["global_batch"])
                deps.append(store.name)
                if val_store is not None:
                    config["val_logits"] = val_store.config["out"]
                    deps.append(val_store.name)
                start = _reusable_start(made, config, name, fmt, nf)
                if start is not None:  # QAD starts from that stage's output instead of quantizing again
                    config.setdefault("init_from", start.config["out"])
                    deps.append(start.name)
            elif needs_calibration(parse_format(fmt), method):
                config["calib"] = data
            if kind == "instruct" and data:
                deps.append("data-chat")
            nodes.append(add(Node(vname, "quantize", config, deps, {"source": source.name, "kind": kind, "model": name})))
            made[(name, fmt, method, nf)] = nodes[-1]
    return nodes


# What a GPTQ start depends on besides model, format and norm fusion (`famex.quant.stage.check_init_from`).
_START_KEYS = ("calib_tokens", "seed", "act_order", "damp")


def _reusable_start(made: dict[tuple, Node], qad: dict[str, Any], name: str, fmt: str, nf: bool) -> Node | None:
    """The GPTQ node of this plan whose output is exactly the start a QAD node with init = "gptq" would compute."""
    from famex.quant.stage import QuantizeConfig

    if qad.get("init", QuantizeConfig.init) != "gptq":  # an RTN start keeps the full-precision latent weights
        return None
    node = made.get((name, fmt, "gptq", nf))
    if node is None or node.config.get("embeddings") or node.config.get("lm_head"):
        return None
    if any(node.config.get(k, getattr(QuantizeConfig, k)) != qad.get(k, getattr(QuantizeConfig, k)) for k in _START_KEYS):
        return None
    return node


def _export_nodes(section: dict[str, Any] | None, quant_nodes: list[Node], root: Path,
                  add: Callable[[Node], Node], where: str) -> list[Node]:
    """Expand [export]: every quantized variant that passes its filters goes to its format's runtime."""
    if not section:
        return []
    section = dict(section)
    filters = {k: section.pop(k) for k in list(section) if k in EXPORT_KEYS}
    for key in ("model", "to", "out"):
        if key in section:
            raise FamexError(f"{where}: [export] {key} is set per variant by the run; filter with methods / formats / "
                             "norm_fusion / models and map formats with targets = {format = \"mlx\"}")
    targets = dict(filters.get("targets", {}))
    for fmt, target in targets.items():
        if target not in ("mlx", "compressed-tensors", "hf"):
            raise FamexError(f"{where}: [export] targets.{fmt} must be \"mlx\", \"compressed-tensors\" or \"hf\", not {target!r}")
    nodes = []
    for q in quant_nodes:
        cfg = q.config
        if "methods" in filters and cfg["method"] not in _as_list(filters["methods"], "[export] methods", where):
            continue
        if "norm_fusion" in filters and cfg["norm_fusion"] not in _as_list(filters["norm_fusion"], "[export] norm_fusion", where):
            continue
        if "formats" in filters and cfg["format"] not in _as_list(filters["formats"], "[export] formats", where):
            continue
        if "models" in filters and q.info["model"] not in _as_list(filters["models"], "[export] models", where):
            continue
        target = targets.get(cfg["format"]) or default_target(cfg["format"])
        name = "export-" + q.name.removeprefix("quantize-")
        config = {**section, "model": cfg["out"], "to": target, "out": str(root / name)}
        nodes.append(add(Node(name, "export", config, [q.name], {**q.info, "eval": bool(filters.get("eval", False))})))
    return nodes


def select(nodes: list[Node], only: list[str] | None, start: str | None) -> list[Node]:
    stages = {n.stage for n in nodes} | {n.name for n in nodes}
    for s in (only or []) + ([start] if start else []):
        if s not in stages:
            raise FamexError(f"unknown stage {s!r} in --only/--from; this recipe has {', '.join(sorted(stages))}")
    chosen = nodes
    if start:
        idx = next(i for i, n in enumerate(nodes) if start in (n.stage, n.name))
        chosen = nodes[idx:]
    if only:
        chosen = [n for n in chosen if n.stage in only or n.name in only]
    return chosen


def print_plan(recipe: Recipe, nodes: list[Node]) -> None:
    print(f"recipe {recipe.path} → {recipe.out}")
    for n in nodes:
        state = "available" if n.available() else "not built yet"
        deps = ", ".join(n.deps) if len(n.deps) <= 4 else f"{len(n.deps)} stages above"
        print(f"  {n.name:<36} famex {n.stage:<9} deps: {deps or '-':<30} ({state})")


def run_node(node: Node, where: str) -> None:
    """Run one stage of the plan (its config checked first; errors name ``where`` and the stage)."""
    module = _module(node.stage)
    cfg = config_from_dict(module.CONFIG, node.config, f"{where} ({node.name})")
    if hasattr(cfg, "validate"):
        cfg.validate()
    module.run(cfg)


def execute(recipe: Recipe, nodes: list[Node]) -> None:
    total = len(nodes)
    t_run = time.perf_counter()
    for i, node in enumerate(nodes, 1):
        if not node.available():
            log(f"[{i}/{total}] {node.name}: skipped — the {node.stage} stage is not built in this famex")
            continue
        log(f"[{i}/{total}] {node.name}: famex {node.stage}")
        t0 = time.perf_counter()
        run_node(node, str(recipe.path))
        log(f"[{i}/{total}] {node.name}: done in {time.perf_counter() - t0:.0f} s")
    log(f"famex run: {recipe.name} finished in {(time.perf_counter() - t_run) / 60:.1f} min; outputs in {recipe.out}")
    report = recipe.out / "report" / "report.md"
    if report.is_file():
        print(f"report: {report}")


# ---------------------------------------------------------------- CLI


@dataclass
class RunArgs:
    recipe: str
    dry_run: bool
    only: list[str] | None
    start: str | None
    out: str | None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe TOML file (configs/demo.toml, configs/apertus-v1.1.toml)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, FLOPs per stage and store size; run nothing")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages (stage kinds or directory names)")
    parser.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage (earlier ones must be complete)")
    parser.add_argument("--out", help="run directory (default: [run] out, else runs/<name>)")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.out)
    nodes = select(recipe.nodes, args.only, args.start)
    if args.dry_run:
        print_plan(recipe, nodes)
        from famex.eval.costdoc import format_document, recipe_cost

        print()
        try:
            print(format_document(recipe_cost(recipe)))
        except FamexError as e:  # the plan stands; only its costs need what is missing
            print(f"No cost table: {e}")
        return 0
    recipe.out.mkdir(parents=True, exist_ok=True)
    # The recipe travels with its run: `famex cost RUN_DIR` and the report read it back.
    from famex.utils import atomic_write_bytes

    atomic_write_bytes(recipe.out / "recipe.toml", recipe.path.read_bytes())
    if recipe.minutes:
        log(f"famex run: {recipe.name} — expected to take about {recipe.minutes:g} minutes on 2 CPU cores")
    execute(recipe, nodes)
    return 0
