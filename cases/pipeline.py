"""One end-to-end case (an arch x a quantization) as a sequence of named stages.

Each stage is a method; the runner times it, records its metrics and, on failure, the exception. A stage
that needs the output of a failed one is recorded as skipped with the reason.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.results import AWAITS_PUBLISHERS, case_id  # the results schema (standard library only)

from . import measure, portable, tiny

# Stage order and the stages each one needs.
STAGES: dict[str, tuple[str, ...]] = {
    "build": (),
    "load": ("build",),
    "lora": ("load",),
    "gc_grads": ("lora",),
    "train": ("lora",),
    "fast_path": ("train",),
    "save_adapter": ("train",),
    "export": ("train",),
    "merge": ("train",),
    "export_reload": ("export",),
    "adapter_reload": ("save_adapter",),
    "foreign_adapters": ("build",),
    "all_linear": ("build",),
    "prequantized": ("build",),
    "prequantized_v4": ("build",),
    "rl_cycles": ("build",),
    "per_expert_adapters": ("build",),
    "serve_merged": ("export",),
    "serve_adapters": ("save_adapter",),
}
SERVING = ("serve_merged", "serve_adapters")  # only where the run names a serving engine (nox -s serve)


def stage_order(shims_on: bool, serving: bool = False) -> list[str]:
    """With shims, export runs from the live PeftModel before merging; natively users export the merged model.
    Serving (shims on: the export and adapters it serves are the shims'; their reference is the live PeftModel, so
    before merge consumes it)."""
    if shims_on:
        middle = ["export", *(SERVING if serving else ()), "merge"]
    else:
        middle = ["merge", "export"]
    return ["build", "load", "lora", "gc_grads", "train", "fast_path", "save_adapter", *middle, "export_reload", "adapter_reload",
            "foreign_adapters", "all_linear", "prequantized", "prequantized_v4", "rl_cycles", "per_expert_adapters"]


def needs(stage: str, shims_on: bool) -> tuple[str, ...]:
    if stage == "export" and not shims_on:
        return ("merge",)
    return STAGES[stage]


@dataclass
class CaseSpec:
    arch: str
    model_type: str
    quant: str
    arch_common: dict
    arch_config: dict
    attention: list[str]
    quant_spec: dict
    run: dict
    shims_on: bool
    cache_dir: str
    work_dir: str
    store_dir: str = ""

    @property
    def case_id(self) -> str:
        return case_id(self.arch, self.quant)

    @property
    def four_bit(self) -> bool:
        return bool(self.quant_spec.get("bnb", {}).get("load_in_4bit"))

    @property
    def recipe(self) -> dict | None:
        """The QLoRA-recipe settings of this quantization (matrix.toml ``recipe``), None for a plain load."""
        return self.quant_spec.get("recipe")

    @property
    def lora_rank(self) -> int:
        return int((self.recipe or {}).get("lora_rank", self.run["lora_rank"]))


@dataclass
class Case:
    spec: CaseSpec
    metrics: dict = field(default_factory=dict)
    model_dir: Path | None = None
    tokenizer: object = None
    model: object = None
    reference: torch.Tensor | None = None
    reference_samples: list | None = None
    merged: object = None
    batch: dict | None = None
    rounded_export_logits: torch.Tensor | None = None
    reference_fp32: torch.Tensor | None = None  # the trained model computing in float32 (see _float32_reference)
    reference_fp32_samples: list | None = None

    # -- helpers -------------------------------------------------------------------------------------------
    @property
    def work(self) -> Path:
        p = Path(self.spec.work_dir) / self.spec.arch / self.spec.quant
        p.mkdir(parents=True, exist_ok=True)
        return p

    def _dtype(self) -> torch.dtype:
        return getattr(torch, self.spec.quant_spec.get("load_dtype", "float32"))

    def _quantization_config(self):
        bnb = self.spec.quant_spec.get("bnb")
        if not bnb:
            return None
        from transformers import BitsAndBytesConfig

        kw = dict(bnb)
        if "bnb_4bit_compute_dtype" in kw:
            kw["bnb_4bit_compute_dtype"] = getattr(torch, kw["bnb_4bit_compute_dtype"])
        return BitsAndBytesConfig(**kw)

    def _load_base(self, path: Path, config=None):
        from transformers import AutoModelForCausalLM

        kwargs = dict(_placement(self.spec.run), **({"config": config} if config is not None else {}))
        qc = self._quantization_config()
        if qc is not None:
            kwargs["quantization_config"] = qc
        model = self._from_pretrained(AutoModelForCausalLM, path, self._dtype(), **kwargs)
        self.metrics["bnb_cpu_bf16_kernel_off"] = measure.keep_bnb_compute_dtype(model)
        return model

    @staticmethod
    def _from_pretrained(cls, path, dtype, **kwargs):
        # every transformers in the matrix (4.57.6 onwards) spells it dtype=
        return cls.from_pretrained(path, dtype=dtype, **kwargs)

    def _compare(self, model, prefix: str) -> None:
        out = measure.logits(model, self.batch)
        self.metrics[f"kl_{prefix}"] = measure.kl(self.reference, out, self.batch["attention_mask"])
        samples = measure.greedy(model, self.tokenizer, tiny.prompts(self.spec.run["prompts"]),
                                 self.spec.run["new_tokens"])
        self.metrics[f"samples_{prefix}"] = measure.agreement(self.reference_samples, samples)

    # -- stages --------------------------------------------------------------------------------------------
    def build(self) -> None:
        self.model_dir, cached = tiny.build_and_save(
            self.spec.model_type, self.spec.arch_common, self.spec.arch_config, Path(self.spec.cache_dir)
        )
        self.metrics["model_cached"] = cached
        self.tokenizer = tiny.build_tokenizer()
        texts = tiny.training_texts()[:6] + tiny.prompts(self.spec.run["prompts"])
        self.batch = dict(self.tokenizer(texts, return_tensors="pt", padding=True))

    def _prepare_recipe(self, model, training: bool):
        """The recipe's peft.prepare_model_for_kbit_training (norms/embeddings to fp32); gradient checkpointing
        only for training. Applied to every model the recipe compares, so references share its dtypes."""
        if self.spec.recipe is None:
            return model
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=training)

    def load(self) -> None:
        self.model = self._load_base(self.model_dir)
        # storage as loaded: the recipe's preparation upcasts float tensors (a float32 router is then no longer
        # "kept wider than the model's dtype")
        self.metrics.update({f"experts_{k}": v for k, v in self._expert_storage(self.model).items()})
        self.metrics.update({f"routers_{k}": v for k, v in self._router_storage(self.model).items()})
        self.model = self._prepare_recipe(self.model, training=True)

    def _router_storage(self, model) -> dict:
        """MoE routers and how many are 4-bit, for nf4 over fused experts (5.x), shims on or off: there a 4-bit
        load should store them as 4.x's Linear4bit routers were. Not counted on 4.x (routers are nn.Linear, or
        float as 4.x always left them), so the rule that reads these counts applies nowhere else."""
        from shims.quant import quant_router  # structure only: counting patches nothing
        from shims.loader_generation import V5, transformers_loader

        if not self.spec.four_bit or transformers_loader() != V5:
            return {}
        from shims.quant.bnb_config import is_skipped

        # routers the case's own llm_int8_skip_modules keeps float (an arch workaround, [archs.workarounds])
        skip = self.spec.quant_spec["bnb"].get("llm_int8_skip_modules") or ()
        skipped = sum(1 for path, _ in quant_router.iter_routers(model) if is_skipped(path, skip))
        return {**quant_router.router_storage(model), "skipped": skipped}

    def _expert_storage(self, model) -> dict:
        """Counted by the harness's own walker (cases.measure), shims on or off: a shim that misses a family of
        expert stacks must not be the one that counts them."""
        return measure.expert_storage(model)

    def lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        targets = expert_targets(self.model)
        # peft reads a string as one regex (a list would be matched as exact names / suffixes)
        module_patterns = [rf".*\.({'|'.join(self.spec.attention)})"] + targets["modules"]
        config = LoraConfig(
            r=self.spec.lora_rank, lora_alpha=self.spec.run["lora_alpha"], lora_dropout=0.0,
            target_modules="|".join(f"(?:{p})" for p in module_patterns),
            task_type="CAUSAL_LM", **({"target_parameters": targets["parameters"]} if targets["parameters"] else {}),
        )
        self.metrics["lora_expert_targets"] = targets["parameters"] or targets["modules"]
        # LoRA's random init from a fixed state: otherwise it depends on the cases run before in the same process,
        # and an arch's result on which archs a run includes (measured: granitemoe alone vs in the full archs run)
        torch.manual_seed(0)
        self.model = get_peft_model(self.model, config)
        expert_lora = measure.lora_expert_params(self.model)
        self.metrics["lora_expert_tensors"] = len(expert_lora)
        if not expert_lora:
            raise AssertionError("peft attached no LoRA to the routed experts")

    def gc_grads(self) -> None:
        """Gradient checkpointing must not change gradients: the first step's LoRA gradients on one batch with
        and without checkpointing (same autocast as training), and how often the first experts module ran in each
        (checkpointing recomputes it in backward, so twice; once without)."""
        if not self.spec.four_bit:
            raise portable.NothingToDo("checked on 4-bit cases")
        model = self.model
        if not getattr(model.base_model.model, "supports_gradient_checkpointing", True):
            raise portable.NothingToDo(f"{type(model.base_model.model).__name__} does not support gradient "
                                       "checkpointing")
        model.train()
        was_on = _checkpointing_flags(model)
        if not any(was_on.values()):
            # the plain nf4 case trains without checkpointing: turn it on as the recipe does, then off again
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            with_gc, calls_gc = self._first_step_grads(checkpointing=True)
            without_gc, calls_plain = self._first_step_grads(checkpointing=False)
        finally:
            if not any(was_on.values()):
                model.base_model.model.gradient_checkpointing_disable()
            else:
                _set_checkpointing(model, was_on)
        if set(with_gc) != set(without_gc):
            raise AssertionError(f"checkpointing changed which parameters get a gradient: "
                                 f"{sorted(set(with_gc) ^ set(without_gc))[:4]}")
        diffs = [float((with_gc[n].float() - without_gc[n].float()).abs().max()) for n in with_gc]
        self.metrics.update(gc_grad_tensors=len(diffs), gc_grad_max_abs=max(diffs) if diffs else None,
                            gc_grad_norm=float(torch.stack([g.float().norm() for g in with_gc.values()]).norm())
                            if with_gc else 0.0,
                            gc_layer_calls=calls_gc, plain_layer_calls=calls_plain)

    def _first_step_grads(self, checkpointing: bool) -> tuple[dict, int]:
        model = self.model
        flags = _checkpointing_flags(model)
        _set_checkpointing(model, {name: checkpointing for name in flags})
        counter = _CallCounter(first_experts_module(model))
        input_ids = self.batch["input_ids"][:4]
        mask = self.batch["attention_mask"][:4]
        device = measure.device_of(model)
        # the same random draws in both runs: some routers sample in training mode (phimoe's sparsemixer), and
        # checkpointing replays the draws of its own forward, not those of another run
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            try:
                model.zero_grad(set_to_none=True)
                with self._autocast(device):
                    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                labels=input_ids.masked_fill(mask == 0, -100).to(device), use_cache=False)
                out.loss.backward()
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                         if p.requires_grad and p.grad is not None}
            finally:
                counter.remove()
                model.zero_grad(set_to_none=True)
                _set_checkpointing(model, flags)
        return grads, counter.calls

    def _autocast(self, device):
        import contextlib

        mixed = (self.spec.recipe or {}).get("mixed_precision")
        if not mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=getattr(torch, {"bf16": "bfloat16"}.get(mixed, mixed)))

    def train(self) -> None:
        from datasets import Dataset
        from transformers import TrainerCallback

        expert_lora = measure.lora_expert_params(self.model)
        before = {n: p.detach().clone() for n, p in expert_lora.items()}
        norms: list[float] = []

        class ExpertGrad(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                norms.append(measure.grad_norm(expert_lora.values()))

        recipe_args = {}
        if not getattr(self.model.base_model.model, "supports_gradient_checkpointing", True):
            recipe_args["gradient_checkpointing"] = False  # trl >= 1.0 turns it on by default; the model refuses it
        if self.spec.recipe is not None:
            recipe_args.update(recipe_trainer_args(self.spec.recipe, measure.device_of(self.model)))
            self.metrics.update(optim_requested=recipe_args.pop("optim_requested"),
                                optim_fallbacks=recipe_args.pop("optim_fallbacks"), optim=recipe_args["optim"])
        trainer = _sft_trainer(self.model, self.tokenizer, Dataset.from_dict({"text": tiny.training_texts()}),
                               self.work / "trainer", self.spec.run["train_steps"], [ExpertGrad()],
                               use_cpu=self.spec.run.get("device", "cpu") == "cpu", **recipe_args)
        counter = _CallCounter(first_experts_module(self.model))
        try:
            trainer.train()
        finally:
            counter.remove()
        # accelerate wraps forward in autocast for mixed precision; the references are the model's own logits
        self.model = trainer.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        self.metrics["train_layer_calls_per_step"] = counter.calls / max(1, trainer.state.global_step)
        if self.spec.recipe is not None:
            self.metrics.update(optimizer_state_counts(trainer.optimizer))
        measure.disable_router_logits(self.model)
        self.metrics["adapter_dtype_trained"] = upcast_adapter(self.model)
        history = [h for h in trainer.state.log_history if "loss" in h]
        losses = [float(h["loss"]) for h in history]
        gnorms = [float(h["grad_norm"]) for h in history if "grad_norm" in h]
        moved = {n for n, p in expert_lora.items() if not torch.equal(before[n], p.detach())}
        self.metrics.update(
            loss_first=losses[0] if losses else None,
            loss_last=losses[-1] if losses else None,
            loss_first3=sum(losses[:3]) / max(1, len(losses[:3])),
            loss_last3=sum(losses[-3:]) / max(1, len(losses[-3:])),
            grad_norm=max(gnorms) if gnorms else None,
            expert_lora_grad_norm=max(norms) if norms else 0.0,
            expert_lora_A_moved=sum(1 for n in moved if "lora_A" in n),
            expert_lora_B_moved=sum(1 for n in moved if "lora_B" in n),
            expert_lora_A_total=sum(1 for n in expert_lora if "lora_A" in n),
            expert_lora_B_total=sum(1 for n in expert_lora if "lora_B" in n),
        )
        self.reference = measure.logits(self.model, self.batch)
        with self.model.disable_adapter():
            unadapted = measure.logits(self.model, self.batch)
        self.metrics["kl_base"] = measure.kl(self.reference, unadapted, self.batch["attention_mask"])
        self.reference_samples = measure.greedy(self.model, self.tokenizer, tiny.prompts(self.spec.run["prompts"]),
                                                self.spec.run["new_tokens"])

    def fast_path(self) -> None:
        """The shims' fast expert LoRA against peft's own ParamWrapper path on the trained model (rule
        fast_path_equals_peft): the same batch in eval mode with shims.lora.fast_lora.ENABLED on and off, and which expert
        LoRA chains took the fast path. Float32 compute only: the rule's bound is fp32 rounding (harness/verdict.py)."""
        if not self.spec.shims_on or not self.spec.four_bit:
            raise portable.NothingToDo("the fast path runs on the shims' 4-bit experts (shims on, 4-bit cases)")
        if self.spec.recipe is not None or self._dtype() != torch.float32:
            raise portable.NothingToDo("compared where the model computes in float32 (the bound is fp32 rounding); "
                                       "the QLoRA recipe computes in bf16")
        self.metrics.update(fast_vs_peft(self.model, self.batch))

    def _float32_reference(self) -> None:
        """The exact reference of a float32 export: the trained model computing in float32. Cases with fp32 compute
        are their own; the recipe (bf16 compute) gets its float32 twin: the same stored values (4-bit ones as
        bitsandbytes decodes them) and LoRA factors, cast exactly, in a float32 copy of the architecture."""
        if self.spec.recipe is None:
            self.reference_fp32, self.reference_fp32_samples = self.reference, self.reference_samples
            return
        twin = self.float32_model()
        self.reference_fp32 = measure.logits(twin, self.batch)
        self.reference_fp32_samples = measure.greedy(twin, self.tokenizer, tiny.prompts(self.spec.run["prompts"]),
                                                     self.spec.run["new_tokens"])
        # what bf16 compute alone does to the trained model (reported: it depends on the CPU's bf16 kernels)
        self.metrics["kl_recipe_bf16_vs_fp32"] = measure.kl(self.reference_fp32, self.reference,
                                                            self.batch["attention_mask"])
        del twin

    def float32_model(self):
        """The trained model computing in float32: itself for cases with fp32 compute, the recipe's float32 twin
        (cases.measure.float32_twin) otherwise. The twin is built on each call: the trained model is its source."""
        if self.spec.recipe is None:
            return self.model
        from transformers import AutoModelForCausalLM

        plain = self._from_pretrained(AutoModelForCausalLM, self.model_dir, torch.float32, **_placement(self.spec.run))
        return measure.float32_twin(self.model, plain)

    def save_adapter(self) -> None:
        self.model.save_pretrained(self.work / "adapter")
        if not self.spec.shims_on and self.spec.store_dir:
            portable.publish(Path(self.spec.store_dir), self.spec.arch, self.spec.quant, self.work / "adapter",
                             self.model_dir, self.reference, self.batch)

    def export(self) -> None:
        dest = self.work / "export"
        shutil.rmtree(dest, ignore_errors=True)
        if self.spec.shims_on:
            import shims

            self._float32_reference()
            counts = shims.save_merged(self.model, dest, dtype=torch.bfloat16, tokenizer=self.tokenizer)
            self.metrics["export_applied"] = counts.get("applied")
            self.metrics["export_attempted"] = counts.get("attempted")
            # The same export in float32 isolates the merge itself from bf16 rounding of W + delta, and its
            # weights rounded to bf16 are exactly what the bf16 export must hold (checked in export_reload).
            exact = self.work / "export-fp32"
            shutil.rmtree(exact, ignore_errors=True)
            shims.save_merged(self.model, exact, dtype=torch.float32, tokenizer=self.tokenizer)
            reloaded = self._load_checkpoint(exact)
            exact_logits = measure.logits(reloaded, self.batch)
            # against the trained model computing in float32 (for the recipe its float32 twin): exact references
            self.metrics["kl_export_fp32"] = measure.kl(self.reference_fp32, exact_logits, self.batch["attention_mask"])
            samples = measure.greedy(reloaded, self.tokenizer, tiny.prompts(self.spec.run["prompts"]),
                                     self.spec.run["new_tokens"])
            self.metrics["samples_export_fp32"] = measure.agreement(self.reference_fp32_samples, samples)
            if self.spec.recipe is not None:  # the same export against the bf16-computing trained model: reported
                self.metrics["kl_export_fp32_vs_bf16"] = measure.kl(self.reference, exact_logits,
                                                                    self.batch["attention_mask"])
            measure.round_as_export(reloaded, torch.bfloat16)  # values as the bf16 export holds them, still fp32
            self.rounded_export_logits = measure.logits(reloaded, self.batch)
            # the bf16 rounding of W + delta alone (computed in fp32): one of the two noises of a 16-bit export
            self.metrics["kl_export_rounded"] = measure.kl(self.reference_fp32, self.rounded_export_logits,
                                                           self.batch["attention_mask"])
        else:
            self.merged.save_pretrained(dest)
            self.tokenizer.save_pretrained(dest)

    def serve_merged(self) -> None:
        from . import serve

        serve.serve_merged(self)

    def serve_adapters(self) -> None:
        from . import serve

        serve.serve_adapters(self)

    def merge(self) -> None:
        before = _expert_weights(self.model)
        merged = self.model.merge_and_unload()
        after = _expert_weights(merged)
        self.metrics["merged_experts_total"] = len(before)
        self.metrics["merged_experts_changed"] = sum(
            1 for name, value in before.items() if name in after and not torch.equal(value, after[name]))
        self.merged = merged
        self.model = None  # merge_and_unload consumed the PeftModel's layers
        self._compare(merged, "merged")

    def export_reload(self) -> None:
        reloaded = self._load_checkpoint(self.work / "export")
        self.metrics.update({f"export_{k}": v for k, v in measure.expert_storage(reloaded).items()
                             if k in ("expert_tensors", "quantized")})
        if self.rounded_export_logits is not None:
            out = measure.logits(reloaded, self.batch)
            self.metrics["export_rounding_max_abs"] = float((out - self.rounded_export_logits).abs().max())
        if self.spec.recipe is not None:
            # the recipe's reference computes in bf16: compare the export as a user reloads it for inference
            reloaded = self._load_checkpoint(self.work / "export", self._dtype())
        self._compare(reloaded, "export")

    def _load_checkpoint(self, path: Path, dtype=torch.float32):
        """A saved checkpoint (an export, or a 4-bit one whose quantization config travels with it), loaded as users
        do, with bitsandbytes kept in its compute dtype."""
        from transformers import AutoModelForCausalLM

        model = self._from_pretrained(AutoModelForCausalLM, path, dtype, **_placement(self.spec.run))
        measure.keep_bnb_compute_dtype(model)  # a native export of a 4-bit merge is itself 4-bit, as is a 4-bit save
        return model

    def adapter_reload(self) -> None:
        from peft import PeftModel

        base = self._prepare_recipe(self._load_base(self.model_dir), training=False)
        reloaded = PeftModel.from_pretrained(base, self.work / "adapter")
        self._compare(reloaded, "adapter")


    def foreign_adapters(self) -> None:
        """Load adapters that other cells trained (other peft / transformers versions) on their own base.

        Natively that is a plain PeftModel.from_pretrained; with shims the adapter is first converted with
        shims.convert_adapter to the layout the installed peft and transformers use. Each load is compared
        with the logits the publishing cell recorded for its trained model.
        """
        if not self.spec.store_dir:
            raise portable.NothingToDo("no adapter store configured for this run")
        if self.spec.quant != "bf16":
            raise portable.NothingToDo("foreign adapters are checked on bf16 cases only")
        entries = portable.foreign_entries(Path(self.spec.store_dir), self.spec.arch, self.spec.quant)
        if not entries:  # the first lane of a fresh run: the second pass re-runs this stage after every lane
            self.metrics.setdefault(AWAITS_PUBLISHERS, []).append("foreign_adapters")
            raise portable.NothingToDo("no adapter from another cell is available yet")
        outcomes = [portable.try_foreign(entry, self._load_base, self.spec.shims_on, self.work / "foreign")
                    for entry in entries]
        self.metrics["foreign"] = outcomes
        self.metrics["foreign_total"] = len(outcomes)
        self.metrics["foreign_ok"] = sum(1 for o in outcomes if o.get("ok"))
        self.metrics["kl_foreign_max"] = max((o["kl"] for o in outcomes if o.get("kl") is not None), default=None)
        bad = [o for o in outcomes if not o.get("ok")]
        if bad:  # an adapter that did not load; the KL of those that did is judged by rule kl_foreign
            raise AssertionError("; ".join(f"{o['from']}: {o.get('error')}" for o in bad))


    def all_linear(self) -> None:
        """LoraConfig(target_modules="all-linear"), the most common config in tutorials, attaches LoRA to the
        attention projections (checked on a fresh bf16 base; no training)."""
        from peft import LoraConfig, get_peft_model

        if self.spec.quant != "bf16":
            raise portable.NothingToDo("all-linear is checked on bf16 cases only")
        model = get_peft_model(self._load_base(self.model_dir),
                               LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and
                   n.rsplit(".", 1)[-1] in self.spec.attention]
        self.metrics["all_linear_attention_targets"] = len(wrapped)
        if not wrapped:
            raise AssertionError("target_modules='all-linear' attached no LoRA to the attention projections")

    def prequantized(self) -> None:
        """Save the 4-bit model itself and load it back: same logits, experts still 4-bit."""
        if not self.spec.four_bit:
            raise portable.NothingToDo("pre-quantized checkpoints are checked on 4-bit cases only")
        model = self._load_base(self.model_dir)
        before = measure.logits(model, self.batch)
        dest = self.work / "prequantized"
        shutil.rmtree(dest, ignore_errors=True)
        model.save_pretrained(dest)
        # the quantization config travels in the checkpoint; the dtype of the rest is the user's choice, as at load
        reloaded = self._load_checkpoint(dest, self._dtype())
        storage = self._expert_storage(reloaded)
        self.metrics["prequantized_experts_quantized"] = storage["quantized"]
        self.metrics["prequantized_expert_tensors"] = storage["expert_tensors"]
        self.metrics.update({f"prequantized_routers_{k}": v for k, v in self._router_storage(reloaded).items()})
        self.metrics["prequantized_max_abs"] = float((measure.logits(reloaded, self.batch) - before).abs().max())
        if self._publishes_prequantized(model):
            portable.publish_prequantized(Path(self.spec.store_dir), self.spec.arch, self.spec.quant, dest,
                                          before, self.batch)

    def _publishes_prequantized(self, model) -> bool:
        """transformers 4.x checkpoints as users download them: the native load's per-expert Linear4bit; where
        4.x fuses the experts itself (gpt_oss), only the shims store them 4-bit, so that run publishes."""
        from shims.loader_generation import transformers_loader
        from shims.quant.storage import iter_expert_modules

        if not self.spec.store_dir or self.spec.quant != "nf4" or transformers_loader() != "v4":
            return False
        fused = any(True for _ in iter_expert_modules(model))
        return self.spec.shims_on == fused

    def prequantized_v4(self) -> None:
        """Load the 4-bit checkpoints transformers 4.x cells published (per-expert Linear4bit experts) and
        reproduce the logits 4.x computed on them; the experts must arrive 4-bit."""
        if not self.spec.four_bit or not self.spec.store_dir:
            raise portable.NothingToDo("checked on 4-bit cases with an artifact store")
        entries = portable.prequantized_entries(Path(self.spec.store_dir), self.spec.arch, self.spec.quant)
        if not entries:
            raise portable.NothingToDo("no transformers 4.x pre-quantized checkpoint published for this case "
                                       "(4.x cells publish them; this cell is 4.x, or none ran before it)")
        outcomes = []
        for entry in entries:
            ref = torch.load(entry / "reference.pt")
            model = self._load_checkpoint(entry / "checkpoint", self._dtype())
            storage = self._expert_storage(model)
            out = measure.logits(model, {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]})
            outcomes.append({"from": entry.name, "max_abs": float((out - ref["logits"]).abs().max()),
                             "experts_quantized": storage["quantized"], "expert_tensors": storage["expert_tensors"]})
        self.metrics.update(
            prequantized_v4=outcomes, prequantized_v4_total=len(outcomes),
            prequantized_v4_max_abs=max(o["max_abs"] for o in outcomes),
            prequantized_v4_experts_4bit=all(o["expert_tensors"] > 0 and o["experts_quantized"] == o["expert_tensors"]
                                             for o in outcomes))

    def per_expert_adapters(self) -> None:
        """Fused expert adapters that transformers 5.x cells trained, on a transformers whose experts are per-expert
        modules (4.57): natively loaded as they are, with shims after shims.convert_adapter(to="per_expert"); each
        must put LoRA on every per-expert module and reproduce its publisher's logits (rule per_expert_adapter)."""
        if not self.spec.store_dir:
            raise portable.NothingToDo("no adapter store configured for this run")
        if self.spec.quant != "bf16":
            # the publishers are native runs: on 5.x their nf4 experts stay bf16, which a 4-bit load here is not
            raise portable.NothingToDo("checked on bf16 cases (native 5.x publishers leave nf4 experts bf16)")
        if portable.has_fused_experts(self._load_base(self.model_dir)):
            raise portable.NothingToDo("experts are fused 3D tensors in this transformers: it reads fused expert "
                                       "LoRA as published (stage foreign_adapters); no per-expert modules")
        entries = portable.fused_entries(Path(self.spec.store_dir), self.spec.arch, self.spec.quant)
        if not entries:
            # a fresh run's 4.57 lanes run before the 5.x lanes: the e2e session's second pass
            # (harness.runner.run_second_pass) re-runs this stage once they have published
            self.metrics.setdefault(AWAITS_PUBLISHERS, []).append("per_expert_adapters")
            raise portable.NothingToDo("no fused-expert adapter published by another cell yet (the second pass "
                                       "re-runs this stage after the transformers 5.x lanes)")
        outcomes = [portable.try_per_expert(entry, self._load_base, self.spec.shims_on, self.work / "per_expert")
                    for entry in entries]
        self.metrics.update(
            per_expert=outcomes, per_expert_total=len(outcomes),
            per_expert_ok=sum(1 for o in outcomes if o.get("ok")),
            per_expert_max_abs=max((o["max_abs"] for o in outcomes if o.get("max_abs") is not None), default=None),
            per_expert_kl_max=max((o["kl"] for o in outcomes if o.get("kl") is not None), default=None),
            per_expert_lora_modules=min((o.get("expert_loras", 0) for o in outcomes), default=0),
            per_expert_linear_modules=max((o.get("expert_linears", 0) for o in outcomes), default=0),
        )
        bad = [o for o in outcomes if not o.get("ok")]
        if bad:  # an adapter that did not load; what the loaded ones compute is judged by rule per_expert_adapter
            raise AssertionError("; ".join(f"{o['from']}: {o.get('error')}" for o in bad))

    def rl_cycles(self) -> None:
        """RL-style merge_adapter -> forward -> unmerge_adapter cycles with a LoRA step between (trl's online
        trainers), on the shims' 4-bit experts: the stored experts after every unmerge, the merged logits' drift."""
        if not self.spec.shims_on or not self.spec.four_bit:
            raise portable.NothingToDo("measured on the shims' 4-bit experts (shims on, 4-bit cases)")
        from peft import LoraConfig, get_peft_model

        from shims.merging.merge_cycles import cycle_drift

        base = self._load_base(self.model_dir)
        targets = expert_targets(base)
        if not targets["parameters"]:
            raise portable.NothingToDo("no fused expert tensors (transformers 4.x per-expert Linear4bit: peft's own "
                                       "Linear4bit merge, not the shims')")
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=self.spec.lora_rank, lora_alpha=self.spec.run["lora_alpha"],
                                                target_modules=[], target_parameters=targets["parameters"],
                                                init_lora_weights=False))
        drift = cycle_drift(model, steps=int(self.spec.run.get("rl_cycles", 200)),
                            input_ids=self.batch["input_ids"][:2].to(measure.device_of(model)))
        self.metrics.update({f"rl_{k}": v for k, v in drift.items()})


def _expert_weights(model) -> dict[str, torch.Tensor]:
    """The routed experts' weights as float copies (dequantized where stored in 4 bits), keyed by a name that is
    the same before and after merge_and_unload."""
    out = {}
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            if not measure.is_expert_module(mod_name, module) or "lora_" in mod_name:
                continue
            key = mod_name.replace("base_model.model.", "").replace(".base_layer", "")
            for pname in measure.expert_tensor_names(module):
                value = getattr(module, pname, None)
                if not isinstance(value, torch.Tensor) or value.dim() < 2:
                    continue
                if value.dtype == torch.uint8 and hasattr(value, "quant_state"):  # bnb Linear4bit (4.57)
                    import bitsandbytes.functional as bnbf

                    value = bnbf.dequantize_4bit(value, value.quant_state)
                out[f"{key}.{pname}"] = value.detach().float().clone()
    return out


def expert_targets(model) -> dict[str, list[str]]:
    """How users target routed experts on this transformers: fused 3D params -> target_parameters
    (e.g. "mlp.experts.gate_up_proj"); per-expert Linear layers -> a target_modules regex."""
    params: set[str] = set()
    linear_names: set[str] = set()
    for mod_name, module in model.named_modules():
        if not measure.is_expert_module(mod_name, module):
            continue
        # getattr, not named_parameters: a parametrized (e.g. 4-bit) tensor is not a direct parameter
        values = {p: getattr(module, p, None) for p in measure.expert_tensor_names(module)}
        values = {p: v for p, v in values.items() if isinstance(v, torch.Tensor)}
        stacks = [p for p, v in values.items() if v.dim() == 3]
        if not stacks and not isinstance(module, torch.nn.Linear) and len(values) >= 2 and all(
                v.dim() == 2 for v in values.values()) and len({tuple(v.shape) for v in values.values()}) == 1:
            stacks = list(values)  # stacks flattened to 2D (E * F, H): dbrx's experts.mlp w1 / v1 / w2
        for pname in stacks:
            parts = mod_name.split(".")
            params.add(".".join(parts[-2:] + [pname]))
        leaf = mod_name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and mod_name.rsplit(".", 2)[-2].isdigit():
            linear_names.add(leaf)
    modules = [rf".*\.experts\.\d+\.({'|'.join(sorted(linear_names))})"] if linear_names else []
    return {"parameters": sorted(params), "modules": modules}


def fast_vs_peft(model, batch: dict) -> dict:
    """Logits of ``model`` (a PeftModel with expert LoRA) with the shims' fast expert-LoRA path and with peft's own
    path (shims.lora.fast_lora.ENABLED False), over the batch's real tokens, and the quantities the rule
    fast_path_equals_peft bounds them with: max |logit| and the summands of the fast-path chains
    (:func:`fast_path_summands`). The fast path's calls are counted in both runs (none may happen with it off)."""
    from shims.lora import fast_lora

    paths = fast_lora.expert_lora_paths(model)
    if not paths:
        raise portable.NothingToDo("no expert ParamWrapper (experts are per-expert modules here): no fast path")
    plans = {name: fast_lora.plan_of(model.get_submodule(name)) for name in paths}
    fast = [p for p in plans.values() if isinstance(p, fast_lora.FastPlan)]
    dtypes = sorted({str(_compute_dtype(p.base)) for p in fast})
    if any(d != str(torch.float32) for d in dtypes):
        raise portable.NothingToDo(f"fast-path experts compute in {dtypes}, not float32 (the bound is fp32 rounding)")
    mask = batch["attention_mask"].bool()
    calls: list[int] = []
    routed, enabled = fast_lora.routed_lora_forward, fast_lora.ENABLED
    # counted where the patched ParamWrapper.forward calls it (a module global, looked up on every call)
    fast_lora.routed_lora_forward = lambda *args: calls.append(1) or routed(*args)
    try:
        fast_lora.ENABLED = True
        with_fast = measure.logits(model, batch)[mask]
        fast_calls = len(calls)
        fast_lora.ENABLED = False
        with_peft = measure.logits(model, batch)[mask]
        peft_calls = len(calls) - fast_calls
    finally:
        fast_lora.routed_lora_forward, fast_lora.ENABLED = routed, enabled
    refused = sorted({path.split(": ", 1)[1] for path in paths.values() if not path.startswith(fast_lora.FAST)})
    return {"fast_path_modules": len(paths), "fast_path_experts": len(fast), "fast_path_calls": fast_calls,
            "fast_path_calls_disabled": peft_calls, "fast_path_refused": refused,
            "fast_path_summands": sum(fast_path_summands(p) for p in fast),
            "fast_vs_peft_max_abs": float((with_fast - with_peft).abs().max()),
            "fast_vs_peft_logit_max": float(with_peft.abs().max())}


def _compute_dtype(base):
    """The dtype a shim 4-bit experts module computes in (its gate / up stack's setting)."""
    from shims.quant.storage import quantized_parametrization

    name = "gate_up_proj" if base.has_gate else "up_proj"
    return quantized_parametrization(base, name).settings.compute_dtype


def fast_path_summands(plan) -> int:
    """The count of float operations whose order the fast path may change in one experts module, as the bound of
    rule fast_path_equals_peft (harness/verdict.py, where it is derived) reads it: per projection p with input
    width n_p and LoRA rank r_p, 2 (n_p + r_p + 3) (both paths' rounding of an n_p-term product, an r_p-term
    LoRA product and three additions / scalings), counted twice for a gated projection (act(gate) * up doubles a
    relative error), plus E for the weighted sum of at most E routed outputs per token. Read from the model's
    stacks and LoRA factors (the harness's own reading of the 4-bit logical shapes, cases.measure)."""
    base = plan.base
    total = int(base.num_experts)
    gate = "gate_up_proj" if base.has_gate else "up_proj"
    for name in (gate, "down_proj"):
        shape = measure.stored_shape(base, name)  # (E, d1, d2): x @ W_e^T reads d2, transposed x @ W_e reads d1
        width = shape[1] if base.is_transposed else shape[2]
        wrapper = plan.wrappers.get(name)
        rank = wrapper.lora_A[plan.adapter].weight.shape[0] // wrapper.num_experts if wrapper is not None else 0
        total += 2 * (width + rank + 3) * (2 if name == gate and base.has_gate else 1)
    return total


def upcast_adapter(model) -> str:
    """trl keeps QLoRA adapters in bf16 while training; a reloaded adapter computes in fp32. Cast the trained
    factors to fp32 (their values are unchanged) so the reference is what the saved adapter means. Returns the
    dtypes the factors had."""
    dtypes = set()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point():
                dtypes.add(str(p.dtype).removeprefix("torch."))
                if p.dtype != torch.float32:
                    p.data = p.data.float()
    return ",".join(sorted(dtypes))


def _placement(run: dict) -> dict:
    """from_pretrained placement: everything on the first GPU when the run asks for CUDA."""
    return {"device_map": {"": 0}} if run.get("device", "cpu") == "cuda" else {}


class _CallCounter:
    """Counts forward calls of one module (checkpointing recomputes a layer's forward during backward). A pre-hook:
    torch's non-reentrant checkpointing stops a recomputation early, inside the layer, so a post-hook never runs."""

    def __init__(self, module):
        self.calls = 0
        self._handle = None if module is None else module.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()


def first_experts_module(model):
    """The module whose forward calls count how often the first MoE layer ran: the parent of the first ``experts``
    (a fused module on 5.x, a ModuleList on 4.57 that is iterated, never called, hence its parent). Where that parent
    is the checkpointed layer itself (gemma4 keeps ``router`` and ``experts`` in its decoder layer), the ``experts``
    module: transformers 5.24 checkpoints a layer's ``forward``, not its ``__call__`` as 5.6.2 did, so the layer's
    own hooks run outside the checkpoint, once, while its children's run again in the recomputation."""
    for name, experts in model.named_modules():
        if name.endswith(".experts"):
            parent = model.get_submodule(name.rpartition(".")[0])
            return experts if _is_checkpointed_layer(parent) else parent
    return None


def _is_checkpointed_layer(module) -> bool:
    return isinstance(getattr(module, "gradient_checkpointing", None), bool)


def _checkpointing_flags(model) -> dict[str, bool]:
    """transformers checkpoints a layer when its ``gradient_checkpointing`` flag is set (and it is training)."""
    return {name: bool(m.gradient_checkpointing) for name, m in model.named_modules() if _is_checkpointed_layer(m)}


def _set_checkpointing(model, flags: dict[str, bool]) -> None:
    for name, on in flags.items():
        model.get_submodule(name).gradient_checkpointing = on


# bitsandbytes optimizer class for each trainer optim name the recipe may ask for
_BNB_OPTIMIZERS = {"paged_adamw_8bit": "PagedAdamW8bit", "adamw_bnb_8bit": "AdamW8bit"}
MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors (its optimizers' min_8bit_size)


def probe_bnb_optimizer(name: str, device) -> str | None:
    """None when bitsandbytes' optimizer ``name`` takes one step on ``device``, else why not (feature detection)."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        return f"bitsandbytes not importable: {exc}"
    cls = getattr(bnb.optim, _BNB_OPTIMIZERS.get(name, ""), None)
    if cls is None:
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} has no optimizer for {name!r}"
    param = torch.nn.Parameter(torch.ones(MIN_8BIT_SIZE, device=device))
    param.grad = torch.full_like(param, 0.5)
    try:
        cls([param], lr=1e-3).step()
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        return f"{name} on {device.type}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return None


def recipe_trainer_args(recipe: dict, device) -> dict:
    """SFTConfig arguments of the recipe: the first 8-bit optimizer that runs on ``device`` (adamw_torch when
    none does), with what was asked for and why anything was passed over."""
    requested = list(recipe.get("optim", []))
    fallbacks = []
    chosen = None
    for name in requested:
        why = probe_bnb_optimizer(name, device)
        if why is None:
            chosen = name
            break
        fallbacks.append(why)
    mixed = recipe.get("mixed_precision")
    return dict(optim=chosen or "adamw_torch", optim_requested=",".join(requested), optim_fallbacks=fallbacks,
                bf16=mixed == "bf16", fp16=mixed == "fp16",
                gradient_checkpointing=bool(recipe.get("gradient_checkpointing")))


def optimizer_state_counts(optimizer) -> dict:
    """How many trained tensors have 8-bit optimizer state, of those large enough to get it."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    eligible = eight_bit = 0
    for group in inner.param_groups:
        for p in group["params"]:
            if p.numel() < MIN_8BIT_SIZE or p not in inner.state:
                continue
            eligible += 1
            eight_bit += inner.state[p].get("state1", torch.empty(0)).dtype == torch.uint8
    return {"optimizer_class": type(inner).__name__, "optim_state_8bit": eight_bit,
            "optim_state_eligible": eligible}


def _sft_trainer(model, tokenizer, dataset, out_dir: Path, steps: int, callbacks: list, use_cpu: bool = True,
                 **recipe_args):
    """trl's SFTTrainer with the harness's settings; ``recipe_args`` (optim, bf16, fp16, gradient_checkpointing)
    override them. Without them, gradient checkpointing is trl's own default (on from trl 1.0, off before)."""
    import inspect

    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    kwargs = dict(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        seed=0, use_cpu=use_cpu, dataloader_num_workers=0, dataset_text_field="text", packing=False,
        bf16=False, fp16=False, disable_tqdm=True,
    )
    kwargs.update(recipe_args)
    accepted = inspect.signature(SFTConfig).parameters
    kwargs["max_length" if "max_length" in accepted else "max_seq_length"] = 64
    trainer = SFTTrainer(model=model, args=SFTConfig(**kwargs), train_dataset=dataset,
                         processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the per-step dicts are in state.log_history already
    return trainer
