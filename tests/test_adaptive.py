"""The adaptive router: a compute-everything rule is bitwise the stock model; a run is bitwise its chosen ladder
plan's run; the mean FLOPs over a batch match the budget asked; the rule is fitted and refused as documented."""

import pytest
import torch

import dit_cache
from dit_cache.adaptive import AdaptiveRule, apply_adaptive, fit_rule, remove_adaptive, step_signal
from dit_cache.flops import step_flops
from dit_cache.bench.peers import module_signature
from dit_cache.plan import CachePlan
from dit_cache.testing import tiny_dit_pipeline, tiny_flux_pipeline, tiny_pixart_pipeline

from test_peers import _stock_everywhere

STEPS = 6


def _call(pipe, seed=0, prompt="a red circle"):
    generator = torch.Generator().manual_seed(seed)
    base = {"generator": generator, "num_inference_steps": STEPS, "output_type": "latent"}
    if not hasattr(pipe, "tokenizer"):
        return {**base, "class_labels": [seed % 2], "guidance_scale": 2.0}
    if type(pipe).__name__.endswith("FluxPipeline"):
        return {**base, "prompt": prompt, "guidance_scale": 2.0, "height": 32, "width": 32, "max_sequence_length": 8}
    return {**base, "prompt": prompt, "guidance_scale": 2.0, "clean_caption": False}


def _ladder(units):
    """Budget -> plan: the full plan, a uniform and a forecasting one (the switch must keep their history)."""
    return {0.0: CachePlan.full(STEPS, units), 0.5: CachePlan.uniform(STEPS, units, 2),
            0.6: CachePlan.taylor(STEPS, units, 3, 1)}


def _units(pipe):
    return len(dit_cache.cache_units(pipe.transformer))


@pytest.mark.parametrize("make_pipe", [tiny_pixart_pipeline, tiny_dit_pipeline, tiny_flux_pipeline],
                         ids=["pixart", "dit", "flux"])
def test_a_compute_everything_rule_is_bitwise_the_stock_model(make_pipe):
    pipe = make_pipe()
    pipe.set_progress_bar_config(disable=True)
    stock = torch.as_tensor(pipe(**_call(pipe)).images)
    signature, pipe_class = module_signature(pipe.transformer), type(pipe)
    switch = apply_adaptive(pipe, {0.0: CachePlan.full(STEPS, _units(pipe))}, AdaptiveRule.compute_everything())
    try:
        assert torch.equal(torch.as_tensor(pipe(**_call(pipe)).images), stock)
        assert switch.picks == [0]
    finally:
        remove_adaptive(pipe)
    assert module_signature(pipe.transformer) == signature and type(pipe) is pipe_class
    assert torch.equal(torch.as_tensor(pipe(**_call(pipe)).images), stock)


def _signals(pipe, calls):
    seen = []

    def hook(module, args, kwargs, output):
        if len(seen) < len(done) + 1:
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.append(float(step_signal(hidden, output[0] if isinstance(output, tuple) else output.sample, True)))

    done = []
    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        for call in calls:
            pipe(**call)
            done.append(None)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("index", [1, 2])
def test_an_adaptive_run_is_bitwise_the_run_of_the_plan_it_picks(index):
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    ladder = _ladder(_units(pipe))
    budgets = list(ladder)
    chosen = dit_cache.accelerate(pipe, plan=ladder[budgets[index]])
    expected = torch.as_tensor(chosen(**_call(pipe)).images)
    dit_cache.decelerate(pipe)
    # a one-bin rule always picks `index`; the fallback (budget 0.5, no forecasts) is what runs before the switch
    rule = AdaptiveRule(budgets=budgets, edges=[], choice=[index], budget=0.5)
    switch = apply_adaptive(pipe, ladder, rule)
    try:
        assert torch.equal(torch.as_tensor(pipe(**_call(pipe)).images), expected)
        assert switch.picks == [index]
    finally:
        remove_adaptive(pipe)


def test_the_mean_flops_over_a_batch_match_the_budget_asked():
    """Fitted on a batch's own signals, the rule's measured mean share of FLOPs skipped over that batch is within
    the tolerance asked (0.05 here, the ladder being coarse: 0, 50 and 67 % skipped)."""
    from dit_cache.bench.peers import StepMeter

    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    units = _units(pipe)
    ladder = _ladder(units)
    budgets = list(ladder)
    flops = step_flops(pipe.transformer)[0]
    skipped = [ladder[b].cached_share(flops) for b in budgets]
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle", "a cat"]
    calls = [_call(pipe, seed, prompt) for seed, prompt in enumerate(prompts)]
    signals = _signals(pipe, calls)
    assert len(set(signals)) == len(signals)  # the signal tells the images apart
    # any table: the budget constraint is what is tested; images with larger signals score better on plan 0
    psnr = [[30 + 10 * s * (j == 0) - j for j in range(len(budgets))] for s in signals]
    budget, tolerance = 0.4, 0.05
    rule = fit_rule(signals, psnr, skipped, budgets, budget, bins=3, tolerance=tolerance)
    assert abs(rule.expected_skipped - budget) <= tolerance
    meter = StepMeter(pipe.transformer)
    switch = apply_adaptive(pipe, {**ladder, budget: ladder[0.5]}, rule)
    measured = []
    try:
        for call in [_call(pipe, seed, prompt) for seed, prompt in enumerate(prompts)]:
            meter.reset()
            pipe(**call)
            measured.append(meter.skipped_flop_share(flops))
    finally:
        remove_adaptive(pipe)
        meter.remove()
    assert switch.picks == [rule.pick(s) for s in signals]
    assert len(set(switch.picks)) > 1  # per image: not one plan for all
    assert measured == pytest.approx([skipped[j] for j in switch.picks], abs=1e-9)
    assert abs(sum(measured) / len(measured) - budget) <= tolerance


def test_a_rule_round_trips_through_safetensors_and_bad_rules_are_refused(tmp_path):
    rule = AdaptiveRule(budgets=[0.3, 0.6], edges=[0.2], choice=[1, 0], budget=0.45, expected_psnr=30.0)
    rule.save(tmp_path / "rule.safetensors")
    assert AdaptiveRule.load(tmp_path / "rule.safetensors") == rule
    assert rule.pick(0.1) == 1 and rule.pick(0.2) == 0
    with pytest.raises(ValueError, match="increasing edges"):
        AdaptiveRule(budgets=[0.3, 0.6], edges=[0.2, 0.1], choice=[0, 1, 0], budget=0.45)
    with pytest.raises(ValueError, match="index the ladder"):
        AdaptiveRule(budgets=[0.3], edges=[], choice=[2], budget=0.3)
    with pytest.raises(ValueError, match="within"):
        fit_rule([0.1, 0.2, 0.3], [[30, 20]] * 3, [0.3, 0.6], [0.3, 0.6], budget=0.9)


def test_a_ladder_plan_that_skips_at_step_zero_is_refused():
    pipe = tiny_pixart_pipeline()
    units = _units(pipe)
    rule = AdaptiveRule(budgets=[0.0], edges=[], choice=[0], budget=0.0)
    plan = CachePlan.full(STEPS, units)
    plan.actions[0, 0] = int(dit_cache.Action.REUSE)  # not buildable as a plan; forced here
    with pytest.raises(ValueError, match="step 0 in full"):
        apply_adaptive(pipe, {0.0: plan}, rule)
    assert _stock_everywhere(pipe.transformer)


def test_the_prompt_tokens_signal_counts_the_conditional_halfs_attended_tokens():
    from dit_cache.adaptive import prompt_tokens

    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])  # [unconditional, conditional]: 2 and 3 tokens
    assert float(prompt_tokens({"encoder_attention_mask": mask}, conditional_half=1)) == 3.0
    assert float(prompt_tokens({"encoder_attention_mask": mask}, conditional_half=0)) == 2.0
    assert float(prompt_tokens({"encoder_attention_mask": mask}, conditional_half=None)) == 2.5
    with pytest.raises(ValueError, match="signal='cfg_gap'"):
        prompt_tokens({}, conditional_half=1)


def test_a_prompt_tokens_rule_picks_by_the_prompts_length_and_runs_that_plan_bitwise():
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    ladder = _ladder(_units(pipe))
    short, long = "a red circle", "a red circle and a blue square and a green triangle"
    lengths = []
    for prompt in (short, long):
        _, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, clean_caption=False)
        lengths.append(float(mask.sum()))
    assert lengths[0] < lengths[1]
    rule = AdaptiveRule(budgets=list(ladder), edges=[sum(lengths) / 2], choice=[1, 2], budget=0.5,
                        signal="prompt_tokens")
    expected = {}
    for prompt, budget in ((short, 0.5), (long, 0.6)):
        chosen = dit_cache.accelerate(pipe, plan=ladder[budget])
        expected[prompt] = torch.as_tensor(chosen(**_call(pipe, prompt=prompt)).images)
        dit_cache.decelerate(pipe)
    switch = apply_adaptive(pipe, ladder, rule)
    try:
        for prompt in (short, long):
            assert torch.equal(torch.as_tensor(pipe(**_call(pipe, prompt=prompt)).images), expected[prompt])
        assert switch.picks == [1, 2]
    finally:
        remove_adaptive(pipe)


def test_a_prompt_tokens_rule_on_a_transformer_without_a_text_mask_is_refused_before_anything_changes():
    pipe = tiny_flux_pipeline()
    signature = module_signature(pipe.transformer)
    units = _units(pipe)
    rule = AdaptiveRule(budgets=[0.0], edges=[], choice=[0], budget=0.0, signal="prompt_tokens")
    with pytest.raises(ValueError, match="takes none: fit the rule on signal='cfg_gap'"):
        apply_adaptive(pipe, {0.0: CachePlan.full(STEPS, units)}, rule)
    assert module_signature(pipe.transformer) == signature and _stock_everywhere(pipe.transformer)


def test_the_embedded_rules_between_whole_step_levels_are_found_by_their_budget():
    import dit_cache
    from dit_cache.flops import percent

    assert (percent(0.5), percent(0.525), percent(0.725)) == ("50%", "52.5%", "72.5%")
    assert (percent(0.5, sign=False), percent(0.725, sign=False)) == ("50", "72.5")  # rule file names
    for budget in (0.525, 0.725):
        rule = AdaptiveRule.load(dit_cache.embedded_adaptive_rule_path(budget))
        assert rule.budget == budget and rule.signal == "prompt_tokens"
        # the two plans it mixes sit on both sides of the budget: neither alone skips what was asked
        shares = sorted(rule.budgets[c] for c in rule.choice)
        assert shares[0] < budget < shares[-1]
    assert dit_cache.embedded_adaptive_rule_path(0.7) is None
