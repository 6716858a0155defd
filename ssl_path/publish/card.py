"""The model card of an exported encoder, made only from records: nothing in it is typed by hand.

Three records feed it:
- the checkpoint: method, steps, resolved config and wall-clock;
- the run's ``run.json`` and the shards' ``manifest.json``: hardware and training data;
- the evaluations' ``results.json`` files (schema in :mod:`ssl_path.evaluation.results`): every score of
  every row goes into the front matter's model-index and into the evaluation tables, under the task and
  title the file states.

The method's title, citation, published weights and what is known of its features come from the
methods registry; nothing here knows a method or an evaluation by name.

:func:`build_card` turns them into a :class:`huggingface_hub.ModelCard`. The prose is the Jinja
template ``model_cards/encoder.md``; huggingface_hub renders it and writes the front matter.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

import ssl_path
from ssl_path.core.config import dump_yaml
from ssl_path.core.errors import UserError, first_line
from ssl_path.data.readers.spec import parse_spec
from ssl_path.encoder import EncoderInfo
from ssl_path.evaluation.bootstrap import UNIT_WORDS
from ssl_path.evaluation.metrics import LOWER_IS_BETTER, TASK_SCORES
from ssl_path.methods import methods
from ssl_path.publish.records import TrainingRecord

TEMPLATE = "encoder.md"
BASE_TAGS = ("pathology", "histology", "self-supervised", "image-feature-extraction", "timm", "ssl-path")
PIPELINE_TAG = "image-feature-extraction"
# What a user's template can raise while it renders: Jinja's own errors, a Python error in one of
# its expressions, or front matter that is not YAML. The shipped template raising one is a bug, kept.
TEMPLATE_ERRORS = (jinja2.TemplateError, yaml.YAMLError, ArithmeticError, LookupError, TypeError, ValueError)


# ----------------------------------------------------------------------------- evaluation


def dataset_name(spec: str | None) -> str:
    """A dataset's short name from its SPEC: the folder or file name, without local paths."""
    if not spec:
        return "unknown"
    try:
        path = parse_spec(spec).path
    except UserError:
        path = spec
    return Path(path.rstrip("/")).stem or path


def tested_on(results: dict[str, Any]) -> str:
    """The name of the set a results file's scores were measured on (its train set under leave-one-out)."""
    return dataset_name(results["dataset"].get("test") or results["dataset"].get("train"))


def _rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    metrics = results["metrics"]
    if isinstance(metrics, dict):
        return [(name, row) for name, row in metrics.items() if isinstance(row, dict)]
    return [(str(row.get("name", i)), row) for i, row in enumerate(metrics) if isinstance(row, dict)]


def _score(row: dict[str, Any], name: str) -> float | None:
    value = row.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# How a file's train and test parts were chosen (its ``split.method``), as the card's table titles say it.
SPLIT_WORDS = {
    "group": "held-out groups",
    "given": "a separate test set",
    "named": "its published test splits",
    "leave-one-domain-out": "each domain held out in turn",
    "fractions": "each label fraction on the same test set",
}


def _split_words(results: dict[str, Any]) -> str:
    method = results["split"].get("method")
    return SPLIT_WORDS.get(method, str(method)) if method else "test"


def _split_name(results: dict[str, Any], row_name: str) -> str:
    """The split a row was scored on, as the model-index names one: a published split's own name
    (rows of several are keyed ``"<split>/<row>"``, under a series' run name where there is one), else
    ``"test"``: every evaluation scores held-out data."""
    split = results["split"]
    if split.get("method") != "named":
        return "test"
    tests = [t for t in split.get("tests", []) if isinstance(t, str)]
    named = [part for part in row_name.split("/") if part in tests]  # a series' rows: "fraction_0.1/testA/..."
    return named[0] if named else tests[0] if len(tests) == 1 else "test"


def eval_results(all_results: Sequence[dict[str, Any]], set_ids: Mapping[str, str] = {}) -> list[EvalResult]:
    """One model-index entry per score of every row of every results file; its dataset is named by
    the Hub id ``set_ids`` gives the set's name, else by that name."""
    entries = []
    for results in all_results:
        probe = results["probe"]
        name = tested_on(results)
        for row_name, row in _rows(results):
            for score in TASK_SCORES.get(results["task"], ()):
                value = _score(row, score)
                if value is None:
                    continue
                entries.append(
                    EvalResult(
                        task_type=results["task"],
                        task_name=results["title"],
                        dataset_type=set_ids.get(name, name),
                        dataset_name=name,
                        dataset_split=_split_name(results, row_name),
                        metric_type=score,
                        metric_name=f"{probe} {row_name} {score}",
                        metric_config=f"{probe}/{row_name}",
                        metric_value=value,
                    )
                )
    return entries


def evaluation_tables(all_results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A markdown-ready table per results file: rows as in the file, one column per score it has."""
    tables = []
    for results in all_results:
        rows = _rows(results)
        scores = [s for s in TASK_SCORES.get(results["task"], ()) if any(_score(row, s) is not None for _, row in rows)]
        body = []
        for row_name, row in rows:
            cells = []
            for score in scores:
                value = _score(row, score)
                ci = row.get(f"{score}_ci95")
                if value is None:
                    cells.append("n/a")
                elif isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
                    cells.append(f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")  # bootstrap intervals need not be symmetric
                else:
                    cells.append(f"{value:.3f}")
            body.append([row_name, *cells])
        dataset = results["dataset"]
        tables.append(
            {
                "title": f"{results['title']} on {tested_on(results)}, {_split_words(results)}",
                "probe": results["probe"],
                "columns": ["row", *(f"{s} (lower is better)" if s in LOWER_IS_BETTER else s for s in scores)],
                "rows": body,
                "images": _image_counts(results),
                "classes": dataset.get("classes") or [],
                "seeds": results.get("seeds") or [],
                "ci": _ci_method(results) if any("[" in c for r in body for c in r[1:]) else None,
                "created": results.get("created"),
            }
        )
    return tables


def _image_counts(results: dict[str, Any]) -> str:
    """How many images a results file trained and tested on, as the card says it.

    Where its rows come from several training sets, each set's counts are given: the folds of a
    probe's leave-one-domain-out (``split.folds``), the runs of a fine-tuning series (``dataset.runs``:
    label fractions, left-out domains); runs of equal counts (seeds) are named together. The file's
    own ``dataset`` counts (None then; one fold's or run's in older files) would stand for all.
    """
    dataset = results["dataset"]
    folds = [f for f in results["split"].get("folds", []) if isinstance(f, dict)]
    if folds:
        total = dataset.get("n_images") or (folds[0].get("n_train") or 0) + (folds[0].get("n_test") or 0)
        each = "; ".join(f"{f.get('domain')}: {_counts(f)}" for f in folds)
        return f"{total} images; each fold holds out one domain and trains on the others (per fold, {each})"
    runs = dataset.get("runs")
    if isinstance(runs, dict) and runs:
        by_counts: dict[str, list[str]] = {}
        for name, run in runs.items():
            by_counts.setdefault(_counts(run), []).append(name)
        each = "; ".join(
            f"{', '.join(names)}: {counts}{' each' if len(names) > 1 else ''}" for counts, names in by_counts.items()
        )
        return f"the rows of each run (their name's first part) trained and tested on its own images ({each})"
    return _counts(dataset)


def _counts(part: dict[str, Any]) -> str:
    return f"{part.get('n_train')} training and {part.get('n_test')} test images"


def _ci_method(results: dict[str, Any]) -> str:
    """How a results file's 95 % intervals were drawn, as the file says."""
    stated = results["config"].get("ci")
    if isinstance(stated, str):
        return re.sub(r"^95 ?%:? *", "", stated)  # the template says 95 % already
    boot = next((r["bootstrap"] for _, r in _rows(results) if isinstance(r.get("bootstrap"), dict)), None)
    if boot:
        units = UNIT_WORDS.get(boot.get("unit"), boot.get("unit"))
        return f"percentile bootstrap over the {boot.get('n_units')} test {units}, {boot.get('resamples')} resamples"
    return "over seeds"


# ----------------------------------------------------------------------------- the card


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_facts(model: nn.Module, info: EncoderInfo, model_args: dict[str, Any]) -> dict[str, Any]:
    return {
        "architecture": info.architecture,
        "params_m": _count_params(model) / 1e6,
        "embed_dim": info.embed_dim,
        "patch_size": info.patch_size,
        "num_blocks": info.num_blocks,
        "reg_tokens": int(model_args.get("reg_tokens") or 0),
        "init_values": model_args.get("init_values"),
        "input_size": info.input_size[-1],
        "mean": [round(v, 4) for v in info.mean],
        "std": [round(v, 4) for v in info.std],
        "dense_blocks": list(info.dense_blocks),
    }


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "encoder"


def template_text(template: Path | None = None) -> str:
    """The card template: ``template`` if given (its Jinja syntax checked), else the shipped ``model_cards/encoder.md``."""
    if template is None:
        return resources.files("model_cards").joinpath(TEMPLATE).read_text()
    if not Path(template).is_file():
        raise UserError(f"card template {template} does not exist")
    try:
        text = Path(template).read_text()
        jinja2.Environment().parse(text)
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"card template {template}: unreadable ({first_line(err)})") from None
    except jinja2.TemplateSyntaxError as err:
        raise UserError(f"card template {template}: line {err.lineno}: {err.message}") from None
    return text


def build_card(
    model: nn.Module,
    info: EncoderInfo,
    model_args: dict[str, Any],
    record: TrainingRecord,
    all_results: Sequence[dict[str, Any]],
    *,
    name: str,
    license: str,
    folder: Path,
    datasets: Sequence[str] = (),
    set_ids: Mapping[str, str] = {},
    template: Path | None = None,
) -> ModelCard:
    """The model card of an encoder, its front matter holding a model-index of every given score.

    ``name`` is ``org/name`` for a card that will go to the Hub; any other name keeps the card local,
    and its loading examples then name ``folder``. ``datasets``: Hub dataset ids for the front matter;
    ``set_ids``: the Hub id of a set results were measured on, by the set's name, for the model-index.
    """
    method = methods().get(record.method or "")
    facts = method.method if method else None
    datasets = list(dict.fromkeys(datasets))
    card_data = ModelCardData(
        model_name=name,
        library_name="timm",
        license=license,
        pipeline_tag=PIPELINE_TAG,
        tags=[*BASE_TAGS, *([record.method] if record.method else [])],
        datasets=datasets or None,
        metrics=[
            s
            for s in dict.fromkeys(s for scores in TASK_SCORES.values() for s in scores)
            if any(_score(row, s) is not None for r in all_results for _, row in _rows(r))
        ]
        or None,
        eval_results=eval_results(all_results, set_ids) or None,
    )
    repo = name if "/" in name else None
    context = {
        "name": name,
        "repo": repo,
        "folder": str(Path(folder).resolve()),
        "license": license,
        "method": record.method,
        "method_title": facts.title if facts else record.method,
        "method_citation": facts.citation if facts else None,
        "method_published": facts.published if facts else "the encoder",
        "method_known": facts.known if facts else "",
        "model": _model_facts(model, info, model_args),
        "record": record,
        "hours": record.wall_time_s / 3600 if record.wall_time_s is not None else None,
        "config_yaml": dump_yaml(record.config).rstrip() if record.config else None,
        "tables": evaluation_tables(all_results),
        "datasets": datasets,
        "slug": _slug(name),
        "year": datetime.now(timezone.utc).year,
        "ssl_path_version": ssl_path.__version__,
    }
    text = template_text(template)
    try:
        return ModelCard.from_template(card_data, template_str=text, **context)
    except TEMPLATE_ERRORS as err:
        if template is None:
            raise
        raise UserError(f"card template {template}: {type(err).__name__}: {first_line(err)}") from None
