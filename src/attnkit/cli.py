"""``attnkit``: list the registry, explain a call, run the benchmark, draw the pattern pictures."""

from __future__ import annotations

from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attnkit")
def main():
    """attnkit: attention mechanisms of the recent literature behind one API."""


@main.command("list")
@click.option("--family", default=None, help="Only this family letter (A static sparse, B dynamic, ...).")
def list_cmd(family):
    """Print the registry: name, family, paper, exact/approximate, supports."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from . import registry

    t = Table(title="attnkit registry")
    for col in ("name", "family", "kind", "exact", "supports", "what", "paper"):
        t.add_column(col, overflow="fold")
    for r in registry.records(family):
        t.add_row(
            r.name,
            r.family,
            r.kind,
            "exact" if r.exact else "approximate",
            ", ".join(sorted(r.supports)),
            escape(r.summary),
            escape(r.paper),
        )
    Console(width=200).print(t)


@main.command()
@click.option(
    "--pattern", "name", default="sliding_window", show_default=True, help="Registry name (a pattern or a selector)."
)
@click.option("-n", "--length", default=4096, show_default=True, help="Sequence length (spatial: about).")
@click.option("--heads", default=8, show_default=True)
@click.option("--kv-heads", default=None, type=int, help="Key/value heads (GQA); default = heads.")
@click.option("--dim", default=64, show_default=True)
@click.option("--train", is_flag=True, help="Inputs require grad (training).")
@click.option("--budget", default=0.125, show_default=True, help="A selector's budget (fraction of the key blocks).")
@click.option("--backend", default="auto", show_default=True)
def explain(name, length, heads, kv_heads, dim, train, budget, backend):
    """Say which backend attnkit.attention would use for a registered pattern or dynamic selector, and why.

    A selector looks at the content: it selects on random q, k (seeded), and its cost is reported."""
    import torch

    from . import api, registry

    rec = registry.get(name)
    Hkv = kv_heads or heads
    if rec.kind == "pattern":
        pat = rec.make(length)
        N, H = pat.fixed_length or length, pat.num_heads or heads
        Hkv = kv_heads or H
    elif rec.kind == "selector":
        pat = rec.make(length, budget=budget, heads=heads, kv_heads=Hkv, head_dim=dim)
        N, H = length, heads
    else:
        raise click.BadParameter(f"expected a pattern or a selector, got {name!r}, a {rec.kind}", param_hint="NAME")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, N, dim, generator=g).requires_grad_(train)
    k, v = (torch.randn(1, Hkv, N, dim, generator=g) for _ in range(2))
    click.echo(api.explain(q, k, v, pattern=pat, backend=backend))


@main.command()
@click.option("--full", is_flag=True, help="Longer sequences (up to 32k), compiled Flex for every pattern.")
@click.option("--sizes", default=None, help="Comma-separated lengths, e.g. 1024,4096 (overrides the default).")
@click.option("--pattern", "patterns", multiple=True, help="Only these registry names (repeatable).")
@click.option(
    "--out",
    default="bench-out",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for results.json, report.md and plots/.",
)
@click.option("--no-peers", is_flag=True, help="Skip NATTEN, local-attention and raw Flex.")
@click.option("--no-backward", is_flag=True, help="Forward only.")
@click.option(
    "--flex",
    type=click.Choice(["none", "targets", "all"]),
    default=None,
    help="Which cells run compiled FlexAttention (default: targets; --full: all).",
)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option(
    "--suite",
    type=click.Choice(["all", "static", "linear", "dynamic", "layers", "distributed", "quality"]),
    default="all",
    show_default=True,
    help="static: family-A patterns; linear: family-C mechanisms (N up to 64k); dynamic: family-B selectors on "
    "real SmolLM2 q, k, v (4k, 16k); layers: attention layers (prefill, decode, cache bytes) beside x-transformers "
    "and nn.MultiheadAttention; distributed: context-parallel attention on 1, 2 and 4 local gloo processes (not in "
    "all); quality: small models trained on MQAR and MAD tasks per causal mechanism and on digits and shapes "
    "per 2-D mechanism (not in all; --full: every mechanism, 3 seeds); all: every suite but distributed and "
    "quality, sharing SDPA timings.",
)
@click.option(
    "--mechanism",
    "mechanisms",
    multiple=True,
    help="Only these mechanisms (repeatable): family-C names in the linear suite, any name in quality.",
)
@click.option("--task", "tasks", multiple=True, help="quality: only these task records (repeatable), e.g. mqar.")
def bench(full, sizes, patterns, out, no_peers, no_backward, flex, dtype, suite, mechanisms, tasks):
    """Benchmark every registered static pattern, linear mechanism and dynamic selector against dense SDPA, the
    matmul rate and the peers.

    The quick default (every target cell; the other static patterns at 1k, the other linear mechanisms and the
    dynamic selectors at 4k on SmolLM2 tensors, one budget; a decode step per pattern at 4k and 32k keys) takes
    under 5 minutes on 2 cores (about 3 more the first time, to capture the SmolLM2 tensors); --full runs the rest.
    """
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import registry
    from .bench import distributed as _distributed
    from .bench import dynamic as _dynamic
    from .bench import layers as _layers
    from .bench import linear as _linear
    from .bench import quality as _quality
    from .bench import suite as _suite
    from .bench.report import print_table, write
    from .bench.static import FULL_SIZES, QUICK_SIZES, BenchConfig

    size_list = tuple(int(s) for s in sizes.split(",")) if sizes else (FULL_SIZES if full else QUICK_SIZES)
    names = tuple(patterns) or None
    mechs = tuple(mechanisms) or None
    for n in (names or ()) + (mechs or ()):
        registry.get(n)
    configs = {
        "static": BenchConfig(
            sizes=size_list,
            patterns=names,
            peers=not no_peers,
            backward=not no_backward,
            flex=flex or ("all" if full else "targets"),
            dtype=dtype,
            full=full,
        ),
        "linear": _linear.LinearConfig(
            sizes=tuple(int(s) for s in sizes.split(",")) if sizes else _linear.SIZES,
            mechanisms=mechs,
            backward=not no_backward,
            peers=not no_peers,
            full=full,
            dtype=dtype,
        ),
        "dynamic": _dynamic.DynamicConfig(peers=not no_peers, full=full),
        "distributed": _distributed.DistributedConfig(
            n=size_list[-1] if sizes else (16384 if full else _distributed.DistributedConfig.n)
        ),
        "quality": _quality.QualityConfig(full=full, mechanisms=mechs, only_tasks=tuple(tasks) or None),
        "layers": _layers.LayersConfig(
            sizes=size_list if sizes else _layers.SIZES,
            peers=not no_peers,
            backward_sizes=() if no_backward else _layers.LayersConfig.backward_sizes,
            full=full,
            dtype=dtype,
        ),
    }
    chosen = _suite.BENCH_SUITES if suite == "all" else (suite,)
    total = sum(s.cells() for s in _suite.make(chosen, configs))
    console = Console(width=None if sys.stdout.isatty() else 200)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as prog:
        task = prog.add_task("benchmark", total=total)

        def step(text):
            prog.update(task, description=text)
            prog.advance(task)

        res = _suite.run_suites(chosen, configs, progress=step, dtype=dtype)
    print_table(res, console)
    paths = write(res, out)
    console.print(f"wrote {paths['json']}, {paths['markdown']} and {len(paths['plots'])} plots")


@main.command("eval")
@click.option("--quick", is_flag=True, help="A 256-token smoke run (a minute): one budget, two passkey depths.")
@click.option("--lengths", default=None, help="Comma-separated perplexity lengths (default 1024,2048,4096).")
@click.option("--passkey-lengths", default=None, help="Comma-separated passkey lengths (default 1024,4096).")
@click.option("--policy", "policies", multiple=True, help="Only these policies (repeatable); dense always runs.")
@click.option("--passkey-budgets", default=None, help="Comma-separated budgets for passkey (default: all three).")
@click.option("--keys", default=1, show_default=True, help="Passkeys per depth and length.")
@click.option("--no-minilm", is_flag=True, help="Skip the MiniLM encoder section.")
@click.option("--no-ppl", is_flag=True, help="Skip the perplexity section (passkey and MiniLM only).")
@click.option("--no-passkey", is_flag=True, help="Skip the passkey section.")
@click.option("--needle", is_flag=True, help="Add RULER's needle variants (bench.needle), at the passkey budgets.")
@click.option("--needle-length", default=1024, show_default=True, help="Tokens per needle prompt.")
@click.option("--needle-depths", default="0.1,0.5,0.9", show_default=True, help="Comma-separated needle depths.")
@click.option("--needle-keys", default=1, show_default=True, help="Needle prompts per depth, variant and haystack.")
@click.option("--haystack", default="natural,filler", show_default=True, help="Needle haystacks: natural, filler.")
@click.option(
    "--variants",
    default="single,multikey,multivalue,multiquery",
    show_default=True,
    help="Needle variants (RULER's niah_single, multikey, multivalue, multiquery).",
)
@click.option(
    "--setting",
    default="agnostic,aware",
    show_default=True,
    help="agnostic: the question is fed after the compressed context; aware: it ends the last context chunk; "
    "aware_one_step: the whole prompt is one step, compressed once (SnapKV's setting).",
)
@click.option(
    "--probe",
    is_flag=True,
    help="Run only the attentive-probe evaluation (bench.probe): mean pooling, the full attentive probe and "
    "efficient probing on frozen MiniLM token features of a generated role-classification task.",
)
@click.option("--probe-examples", default=3000, show_default=True, help="Sentences of the probe task.")
@click.option("--probe-seeds", default="0,1,2", show_default=True, help="Comma-separated probe training seeds.")
@click.option(
    "--mla",
    is_flag=True,
    help="Instead: SmolLM2 converted to MLA (bench.mla): perplexity, KL, KV bytes and speed at 1/4..1x the GQA cache.",
)
@click.option("--mla-windows", default=4, show_default=True, help="512-token evaluation windows for --mla.")
@click.option(
    "--mla-distill-steps",
    default=0,
    show_default=True,
    help="With --mla: also a distilled row per budget, this many layer-local Adam steps per layer (distill_mla).",
)
@click.option(
    "--interventions",
    is_flag=True,
    help="Instead: family-G interventions (PASTA, VAR, amplification, VHR, CARVE, CausalMM) on counterfactual QA.",
)
@click.option(
    "--pruning",
    is_flag=True,
    help="Instead: family-F token pruning (FastV, PyramidDrop, DyVTE, P-Sigmoid) on pass-key span QA (bench.pruning).",
)
@click.option(
    "--option-order",
    is_flag=True,
    help="Instead: option-order flips of generated multiple-choice questions, dense against PINE (bench.option_order).",
)
@click.option(
    "--length",
    "length_extrapolation",
    is_flag=True,
    help="Instead: perplexity past SmolLM2's 8k training length, dense against log-n scaling and SSMax (bench.length).",
)
@click.option(
    "--encoder-pruning",
    is_flag=True,
    help="Instead: [CLS]-ranked pruning and merging inside MiniLM, embedding cosine (bench.encoder_pruning).",
)
@click.option(
    "--emphasis",
    is_flag=True,
    help="Instead: PASTA on a format instruction the model tends to ignore (bench.emphasis).",
)
@click.option(
    "--classify",
    is_flag=True,
    help="Instead: ACT's searched calibration on generated sentiment classification (bench.classify).",
)
@click.option("--out", default="bench-out", show_default=True, type=click.Path(path_type=Path))
def eval_cmd(
    quick,
    lengths,
    passkey_lengths,
    passkey_budgets,
    policies,
    keys,
    no_minilm,
    no_ppl,
    no_passkey,
    needle,
    needle_length,
    needle_depths,
    needle_keys,
    haystack,
    variants,
    setting,
    probe,
    probe_examples,
    probe_seeds,
    mla,
    mla_windows,
    mla_distill_steps,
    interventions,
    pruning,
    option_order,
    length_extrapolation,
    classify,
    emphasis,
    encoder_pruning,
    out,
):
    """Perplexity, KL to dense, passkey accuracy, prefill/decode time and peak KV memory of every KV policy on
    SmolLM2-135M (offline), plus MiniLM embeddings under a sparse prefill. Writes eval.md, eval.json, plots.

    The default run takes about an hour on 2 cores; --quick about a minute. --probe runs the probe
    evaluation alone (about eight minutes on 2 cores; with --quick, 400 sentences and one seed) and writes
    probe.md, probe.json. --mla runs the GQA-to-MLA conversion of SmolLM2 alone (its rank curve, about fifteen
    minutes) and writes eval_mla.md, eval_mla.json. --interventions and --pruning (each a few
    minutes) run family G on counterfactual-context QA and family F on pass-key span QA and write
    eval_interventions.* / eval_pruning.*; --option-order asks generated multiple-choice
    questions in every cyclic order of their options, dense against PINE, and writes eval_option_order.*;
    --length scores perplexity past the 8k training length under log-n scaling and SSMax
    (eval_length.*); --classify searches ACT's layers on generated sentiment prompts and
    tests them on others (eval_classify.*); --emphasis measures PASTA on a format instruction
    (eval_emphasis.*); --encoder-pruning prunes and merges tokens inside MiniLM by [CLS]
    attention and writes eval_encoder_pruning.*.
    """
    if encoder_pruning:
        import json

        from .bench import encoder_pruning as _ep
        from .models import load_minilm

        model, tok = load_minilm()
        res = _ep.run(model, tok, count=8 if quick else 32, sweep=not quick, say=click.echo)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_encoder_pruning.json").write_text(json.dumps(res, indent=1))
        (out / "eval_encoder_pruning.md").write_text(_ep.markdown(res))
        click.echo(_ep.markdown(res))
        return
    if pruning or interventions or option_order or length_extrapolation or classify or emphasis:
        from .bench import classify as _cl
        from .bench import emphasis as _em
        from .bench import interventions as _iv
        from .bench import length as _ln
        from .bench import option_order as _oo
        from .bench import pruning as _pr

        if length_extrapolation:
            _smollm2_eval(_ln, "length", out, tokens=9216 if quick else 12288)
        if emphasis:
            _smollm2_eval(_em, "emphasis", out, n=8 if quick else 24, profile=4 if quick else 8)
        if classify:
            _smollm2_eval(_cl, "classify", out, n=16 if quick else 48, search=8 if quick else 16)
        if option_order:
            _smollm2_eval(_oo, "option_order", out, n=8 if quick else 40)
        if pruning:
            _smollm2_eval(
                _pr, "pruning", out, tokens=256 if quick else 1024, prompts=2 if quick else 8, search=1 if quick else 4
            )
        if interventions:
            _smollm2_eval(_iv, "interventions", out, n=8 if quick else 24, profile=4 if quick else 8)
        return
    if probe:
        from .bench import probe as _probe

        seeds = tuple(int(x) for x in probe_seeds.split(",") if x.strip())
        kw = {"n_examples": probe_examples, "seeds": seeds}
        if quick:
            kw = {"n_examples": 400, "seeds": seeds[:1], "epochs": 10}
        rows = _probe.run_probe_eval(**kw, progress=click.echo)
        paths = _probe.write(rows, out)
        click.echo(_probe.markdown(rows))
        click.echo(f"wrote {paths['json']} and {paths['markdown']}")
        return
    import dataclasses
    from fractions import Fraction

    if mla:
        import json

        from .bench import mla as _mla

        res = _mla.run_mla_eval(n_windows=mla_windows, distill_steps=mla_distill_steps, progress=click.echo)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_mla.json").write_text(json.dumps(res, indent=1))
        (out / "eval_mla.md").write_text(_mla.markdown(res) + "\n")
        click.echo(_mla.markdown(res))
        click.echo(f"wrote {out / 'eval_mla.json'} and {out / 'eval_mla.md'}")
        return

    from .bench import models as _models
    from .bench import needle as _needle

    def names(value, allowed, hint):
        got = tuple(x.strip() for x in value.split(",") if x.strip())
        if not got or set(got) - set(allowed):
            raise click.BadParameter(f"expected names from {allowed}, got {value!r}", param_hint=hint)
        return got

    cfg = _models.QUICK if quick else _models.EvalConfig()
    changes = {"keys_per_depth": keys, "minilm": not no_minilm, "passkey": not no_passkey}
    if needle:
        changes.update(
            needle=True,
            needle_length=needle_length,
            needle_depths=tuple(float(x) for x in needle_depths.split(",")),
            needle_per_depth=needle_keys,
            needle_haystacks=names(haystack, _needle.HAYSTACKS, "--haystack"),
            needle_variants=names(variants, _needle.VARIANTS, "--variants"),
            needle_settings=names(setting, _needle.SETTINGS, "--setting"),
        )
    if lengths:
        changes["lengths"] = tuple(int(x) for x in lengths.split(","))
    if passkey_lengths:
        changes["passkey_lengths"] = tuple(int(x) for x in passkey_lengths.split(","))
    if no_ppl:
        changes["lengths"] = ()
    if passkey_budgets:
        changes["passkey_budgets"] = tuple(float(Fraction(x)) for x in passkey_budgets.split(","))
    if policies:
        changes["policies"] = ("dense",) + tuple(p for p in policies if p != "dense")
        bad_names = set(changes["policies"]) - set(_models.POLICIES)
        if bad_names:
            raise click.BadParameter(
                f"expected names from {_models.POLICIES}, got {sorted(bad_names)}", param_hint="--policy"
            )
    cfg = dataclasses.replace(cfg, **changes)
    res = _models.run_eval(cfg, progress=click.echo)
    paths = _models.write(res, out)
    click.echo(_models.markdown(res))
    click.echo(f"wrote {paths['json']}, {paths['markdown']} and {len(paths['plots'])} plots")


def _smollm2_eval(module, name: str, out: Path, **kw) -> None:
    """Run ``module.run(model, tok, **kw)`` on SmolLM2 and write ``eval_<name>.json`` and ``.md``."""
    import json

    from .models import load_smollm2

    model, tok = load_smollm2()
    res = module.run(model, tok, say=click.echo, **kw)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval_{name}.json").write_text(json.dumps(res, indent=1))
    (out / f"eval_{name}.md").write_text(module.markdown(res))
    click.echo(module.markdown(res))
    click.echo(f"wrote {out / f'eval_{name}.json'} and {out / f'eval_{name}.md'}")


@main.command()
@click.option("--model", "model_name", type=click.Choice(["smollm2", "minilm"]), default="smollm2", show_default=True)
@click.option(
    "--text",
    "text_file",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A text file to analyse (default: the Python reference manual shipped with Python).",
)
@click.option(
    "--task",
    type=click.Choice(["text", "needle", "induction", "ioi"]),
    default="text",
    show_default=True,
    help="text: capture, sinks, head maps, rollout; needle: retrieval heads; induction; ioi: patching.",
)
@click.option("--tokens", default=1024, show_default=True, help="Tokens of the text captured (task text).")
@click.option("--out", default="analyze-out", show_default=True, type=click.Path(path_type=Path))
def analyze(model_name, text_file, task, tokens, out):
    """See what attention does inside a real model (offline): writes report.md, analysis.json, JSON per score
    and pictures (head heatmaps, sink mass per layer, distance profiles, pooled maps, rollout and flow)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .analysis import analyze as run

    text = text_file.read_text(errors="replace") if text_file is not None else None
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as bar:
        job = bar.add_task("loading the model", total=None)
        data = run(
            model_name, task=task, text=text, tokens=tokens, out=out, say=lambda s: bar.update(job, description=s)
        )
    click.echo((out / "report.md").read_text())
    click.echo(f"wrote {out / 'report.md'} and {out / 'analysis.json'} ({data['wall_s']} s)")


@main.command()
@click.option("--method", type=click.Choice(["duo", "moa"]), required=True, help="DuoAttention gates or MoA profile.")
@click.option("--length", default=1024, show_default=True, help="Tokens per calibration sample.")
@click.option("--samples", default=None, type=int, help="Samples (default: duo 8, moa 4).")
@click.option("--steps", default=60, show_default=True, help="Optimisation steps (duo).")
@click.option("--lr", default=0.05, show_default=True, help="Gate learning rate (duo).")
@click.option("--sinks", default=16, show_default=True, help="Streaming heads' sink tokens (duo).")
@click.option(
    "--recent",
    default=48,
    show_default=True,
    help="Streaming heads' recent window during calibration (duo); keep it at the fraction of the context "
    "the deployment window will cover (48 of 1k ~ 256 of 4k).",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(path_type=Path),
    help="File or folder (default: ~/.cache/attnkit/calibrations).",
)
def calibrate(method, length, samples, steps, lr, sinks, recent, out):
    """Calibrate a KV policy on SmolLM2 offline and save it as JSON keyed by the model's config.

    duo: DuoAttention's gate optimisation on generated passkey prompts; moa: MoA's attention-influence profile
    on English text. Load the result with ``DuoAttention.load(model, path)`` / ``MoA.load(model, budget, path)``.
    """
    import torch

    from .hf import artifacts, duo, moa
    from .models import load_smollm2
    from .models.smollm2 import cache_dir

    torch.manual_seed(0)
    model, tok = load_smollm2()
    if method == "duo":
        res = duo.calibrate(
            model,
            tok,
            length=length,
            samples=samples or 8,
            steps=steps,
            lr=lr,
            sinks=sinks,
            recent=recent,
            progress=click.echo,
        )
        name = duo.METHOD
    else:
        res = moa.profile(model, tok, length=length, samples=samples or 4, progress=click.echo)
        name = moa.METHOD
    target = Path(out) if out else cache_dir().parent / "calibrations"
    if target.suffix != ".json":
        target = target / f"{name}-{artifacts.model_key(model)}.json"
    path = artifacts.save(target, model, name, res["values"], res["settings"])
    click.echo(f"wrote {path}")


@main.command()
@click.option("--out", default="docs/patterns", show_default=True, type=click.Path(path_type=Path))
def pictures(out):
    """Draw a PNG of every registered pattern's mask (the pictures in docs/patterns)."""
    from .bench.pictures import draw_all

    for p in draw_all(out):
        click.echo(p)


if __name__ == "__main__":
    main()
