"""The rejection sampler and logits processing, as pure tensor functions."""

import pytest
import torch
from stats import chi_square_pvalue

from vocabtrim.errors import UserError
from vocabtrim.engine.sampling import (
    SamplingParams,
    Verdict,
    first_rejection,
    logits_to_probs,
    row_seed,
    sample_from_probs,
    verify_exact,
    verify_greedy,
    verify_sampled,
)

# Each distribution check below uses a fixed seed, so it is deterministic; the threshold 1e-4 is the
# false-alarm rate it would have over fresh seeds (one run in 10,000 of a correct sampler fails).
ALPHA = 1e-4


def test_top_k_and_top_p_keep_exactly_the_expected_ids():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    # top-p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too; 0.1 and 0.05 are dropped.
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.allclose(p, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    # top-p smaller than the top token's mass keeps the top token alone.
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.1))
    assert p[0, 0] == 1 and p[0, 1:].sum() == 0


def test_temperature_then_top_p_give_the_hand_computed_law():
    """T = 0.5 squares the probabilities: [.25, .04, .0225, .01, .0025] / .325, i.e. .769, .123, .069, ...;
    top-p 0.9 on those keeps three ids (.769 + .123 < .9), renormalised: [.8, .128, .072]. Top-p before the
    temperature would keep four (.5 + .2 + .15 < .9)."""
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = logits_to_probs(logits, SamplingParams(temperature=0.5, top_p=0.9))
    torch.testing.assert_close(p, torch.tensor([[0.8, 0.128, 0.072, 0.0, 0.0]]))
    p = logits_to_probs(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(p, torch.tensor([[0.25, 0.04, 0.0225, 0.01, 0.0025]]) / 0.325)


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]])
    hot, cold = (logits_to_probs(logits, SamplingParams(temperature=t))[0, 0] for t in (2.0, 0.5))
    assert cold > torch.softmax(logits, -1)[0, 0] > hot


def test_a_temperature_near_zero_gives_the_argmax_not_an_overflow():
    """At a temperature so small that logits / T overflow float32, the law is still the point mass on the argmax
    (ties shared), and the Gumbel-max sample is the argmax whatever the noise."""
    from vocabtrim.engine.sampling import gumbel_argmax

    logits = torch.tensor([[3.0, 9.5, -2.0, 9.5 - 1e-3], [-40.0, -1.0, 60.0, 59.0]])
    noise = torch.tensor([[0.0, -5.0, 30.0, 20.0], [30.0, 25.0, -5.0, 40.0]])
    tie = torch.tensor([[1.0, 7.0, 7.0]])
    for t in (1e-40, 1e-50, 5e-324):  # 1e-50 and below: a divisor that float32 rounds to 0
        tiny = SamplingParams(temperature=t)
        torch.testing.assert_close(logits_to_probs(logits, tiny), torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
        assert gumbel_argmax(logits, tiny, noise).tolist() == [1, 2]
        torch.testing.assert_close(logits_to_probs(tie, tiny), torch.tensor([[0.0, 0.5, 0.5]]))


def test_bad_sampling_params_are_user_errors():
    for kwargs in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(UserError):
            SamplingParams(**kwargs)


def test_sampling_never_returns_a_zero_probability_id():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0]]).expand(6, -1)
    u = torch.tensor([0.0, 1e-12, 0.3, 0.2999999, 0.9999999, 1.0 - 1e-16])
    out = sample_from_probs(probs, u)
    assert set(out.tolist()) <= {1, 3}
    assert out.tolist()[:2] == [1, 1] and out[-1] == 3


def test_first_rejection_counts_leading_accepts():
    accept = torch.tensor([[True, True, False, True], [False, True, True, True], [True] * 4])
    assert first_rejection(accept).tolist() == [2, 0, 4]


def test_row_seed_is_stable_and_distinct():
    assert row_seed(0, "a") == 8348787342930090591  # the same on every run and machine (a hash, not Python's)
    assert len({row_seed(0, "a"), row_seed(1, "a"), row_seed(0, "b")}) == 3


def test_verify_greedy_accepts_while_equal_to_argmax():
    logits = torch.full((1, 4, 6), -5.0)
    for pos, tok in enumerate([3, 1, 4, 0]):
        logits[0, pos, tok] = 5.0
    v = verify_greedy(torch.tensor([[3, 1, 5]]), logits)
    assert v.accepted.tolist() == [2] and v.next_token.tolist() == [4]  # recovered = target argmax
    v = verify_greedy(torch.tensor([[3, 1, 4]]), logits)
    assert v.accepted.tolist() == [3] and v.next_token.tolist() == [0]  # bonus token


def _one_step_output_distribution(p, q, n, support=None, seed=0, verify=verify_sampled):
    """Run one gamma=1 verification for n independent rows; return counts of the emitted token.

    The emitted token is the draft if accepted, else the recovered token: its law must be p.
    """
    g = torch.Generator().manual_seed(seed)
    v = p.shape[-1]
    kq = q.shape[-1]
    draft_idx = sample_from_probs(q.expand(n, -1), torch.rand(n, generator=g))
    draft = draft_idx if support is None else support[draft_idx]
    verdict = verify(
        draft[:, None],
        q.expand(n, 1, kq),
        p.expand(n, 2, v),
        torch.rand(n, 1, generator=g),
        torch.rand(n, generator=g),
        support,
    )
    emitted = torch.where(verdict.accepted == 1, draft, verdict.next_token)
    return torch.bincount(emitted, minlength=v)


@pytest.mark.parametrize("support", [None, torch.tensor([0, 2, 3, 5])], ids=["full", "trimmed"])
def test_a_row_that_made_fewer_drafts_gets_the_verdict_of_a_step_of_that_many(support):
    """``drafts`` [B]: a row that made d < G drafts (the rest pad the batch) gets exactly what a step of d drafts gives it,
    the bonus token included, from both verify rules; d = G changes nothing."""
    g, v, b = 4, 6, 400
    gen = torch.Generator().manual_seed(0)
    k = v if support is None else len(support)
    q = torch.softmax(3 * torch.randn(b, g, k, generator=gen), -1)
    ids = torch.multinomial(q.reshape(-1, k), 1, generator=gen).reshape(b, g)
    tokens = ids if support is None else support[ids]
    p = torch.softmax(3 * torch.randn(b, g + 1, v, generator=gen), -1)
    p[:, :g].scatter_add_(-1, tokens[..., None], torch.full((b, g, 1), 2.0))  # drafts often accepted
    p = p / p.sum(-1, keepdim=True)
    u_accept, u_recover = torch.rand(b, g, generator=gen), torch.rand(b, g + 1, generator=gen)
    choices = torch.where(torch.rand(b, g + 1, generator=gen) < 0.7, torch.cat([tokens, tokens[:, :1]], 1),
                          torch.randint(0, v, (b, g + 1), generator=gen))
    made = torch.randint(0, g + 1, (b,), generator=gen)
    sampled = verify_sampled(tokens, q, p, u_accept, u_recover, support, made)
    exact = verify_exact(tokens, choices, made)
    for r in range(b):
        d = int(made[r])
        one = verify_sampled(tokens[r : r + 1, :d], q[r : r + 1, :d], p[r : r + 1, : d + 1], u_accept[r : r + 1, :d],
                             u_recover[r : r + 1, : d + 1], support)
        assert (int(sampled.accepted[r]), int(sampled.next_token[r])) == (int(one.accepted), int(one.next_token)), r
        one = verify_exact(tokens[r : r + 1, :d], choices[r : r + 1, : d + 1])
        assert (int(exact.accepted[r]), int(exact.next_token[r])) == (int(one.accepted), int(one.next_token)), r
    full = made == g
    assert 0 < int(full.sum()) < b and bool((sampled.accepted[~full] == made[~full]).any())  # both kinds of rows, and
    # rows that accepted every draft they made (whose bonus comes from p, not the residual)
    plain = verify_sampled(tokens, q, p, u_accept, u_recover, support)
    assert torch.equal(plain.accepted[full], sampled.accepted[full]) and torch.equal(plain.next_token[full], sampled.next_token[full])


def test_one_step_emits_exactly_p_with_full_and_trimmed_drafter():
    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.0, 0.2])
    q_full = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.15, 0.05])  # puts mass where p has none (id 4)
    counts = _one_step_output_distribution(p[None], q_full[None], 200_000)
    assert counts[4] == 0
    assert chi_square_pvalue(counts, p) > ALPHA
    support = torch.tensor([1, 2, 4])  # trimmed head: q is zero outside these ids
    q_trim = torch.tensor([0.2, 0.5, 0.3])
    counts = _one_step_output_distribution(p[None], q_trim[None], 200_000, support)
    assert chi_square_pvalue(counts, p) > ALPHA


def _recover_from_p(draft_tokens, draft_q, target_p, u_accept, u_recover, draft_support=None):
    """A wrong rule: the right acceptance test, but a rejected draft is replaced by a sample from p, not from
    the residual max(p - q, 0)."""
    v = verify_sampled(draft_tokens, draft_q, target_p, u_accept, u_recover, draft_support)
    rows = torch.arange(draft_tokens.shape[0])
    from_p = sample_from_probs(target_p[rows, v.accepted], u_recover)
    return Verdict(accepted=v.accepted, next_token=torch.where(v.accepted == draft_tokens.shape[1], v.next_token, from_p))


@pytest.mark.parametrize("head", ["full", "trimmed"])
def test_the_same_check_rejects_a_sampler_that_recovers_from_p(head):
    """Power of the check above (the same sample size, alpha 1e-4): the wrong rule's output law is detected."""
    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.0, 0.2])
    if head == "full":
        q, support = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.15, 0.05]), None
    else:
        q, support = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([1, 2, 4])
    counts = _one_step_output_distribution(p[None], q[None], 200_000, support, verify=_recover_from_p)
    assert chi_square_pvalue(counts, p) < ALPHA


def test_the_check_has_power_against_a_wrong_distribution():
    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.0, 0.2])
    counts = _one_step_output_distribution(p[None], p[None], 200_000)
    wrong = torch.tensor([0.06, 0.39, 0.1, 0.25, 0.0, 0.2])
    assert chi_square_pvalue(counts, p) > ALPHA
    assert chi_square_pvalue(counts, wrong) < ALPHA


# ------------------------------------------------------------------------------------------------
# Counter-based noise
# ------------------------------------------------------------------------------------------------


def test_noise_is_a_pure_function_of_seed_position_stream_and_token():
    from vocabtrim.engine.sampling import STREAM_DRAFT, gumbel_noise, noise_keys, noise_uniform, seed_words

    words = seed_words(torch.tensor([row_seed(0, "a"), row_seed(0, "b")]))
    positions = torch.arange(64).expand(2, -1)
    u = noise_uniform(words, positions, STREAM_DRAFT)
    assert torch.equal(u, noise_uniform(words[[1, 0]], positions, STREAM_DRAFT)[[1, 0]])  # whatever the row order
    assert 0 < float(u.min()) and float(u.max()) < 1
    g = gumbel_noise(noise_keys(words, positions, STREAM_DRAFT), torch.arange(50))  # [2, 64, 50]
    assert torch.equal(g, gumbel_noise(noise_keys(words[[1, 0]], positions, STREAM_DRAFT), torch.arange(50))[[1, 0]])
    assert torch.equal(g[:, :, 10:20], gumbel_noise(noise_keys(words, positions, STREAM_DRAFT), torch.arange(10, 20)))  # per token id
    assert g.flatten().unique().numel() > 0.99 * g.numel()  # one draw per (seed, position, token)
    # Every (position, stream) pair of a row gets its own key: no draw is reused for another purpose.
    keys = torch.cat([noise_keys(words, positions, s) for s in range(4)], dim=1)  # [2, 256]
    assert all(len(set(row.tolist())) == 256 for row in keys)


def test_a_uniform_holds_more_than_its_32_bit_key():
    """Two draws whose 32-bit keys collide (about 5 pairs among 200,000 keys) still get different uniforms: the
    2**-53 grid is filled from two independent keys, not from one key's 2**32 values."""
    from vocabtrim.engine.sampling import STREAM_ACCEPT, noise_keys, noise_uniform, seed_words

    words = seed_words(torch.tensor([row_seed(11, str(i)) for i in range(2000)]))
    positions = torch.arange(100).expand(2000, -1)
    keys = noise_keys(words, positions, STREAM_ACCEPT).flatten()
    u = noise_uniform(words, positions, STREAM_ACCEPT).flatten()
    order = torch.argsort(keys, stable=True)
    same = (keys[order][1:] == keys[order][:-1]).nonzero().flatten()
    assert same.numel() >= 1  # the birthday bound at 2**32: the check has collisions to look at
    assert bool((u[order][same] != u[order][same + 1]).all())


def test_uniforms_are_uniform_below_float32_resolution():
    """The uniforms of the acceptance test and of inverse-CDF draws resolve probabilities far below 2**-23: the
    part of u under 2**-23 is itself uniform (chi-square over 16 bins, false-alarm rate 1e-4). The control,
    23-bit uniforms as float32 gives them, puts all of it in one bin."""
    from vocabtrim.engine.sampling import STREAM_ACCEPT, noise_keys, noise_uniform, seed_words

    words, positions = seed_words(torch.tensor([row_seed(3, str(i)) for i in range(1000)])), torch.arange(100).expand(1000, -1)
    keys = noise_keys(words, positions, STREAM_ACCEPT)
    u = noise_uniform(words, positions, STREAM_ACCEPT)
    assert u.dtype == torch.float64 and 0 < float(u.min()) and float(u.max()) < 1

    def below_2_23(u):
        return torch.bincount(((u.double() * 2**23) % 1 * 16).long().flatten(), minlength=16)

    flat = torch.full((16,), 1 / 16)
    assert chi_square_pvalue(below_2_23(u), flat) > ALPHA
    u23 = ((keys >> 9) & 0x7FFFFF).to(torch.float32).add_(0.5).mul_(2.0**-23)
    assert chi_square_pvalue(below_2_23(u23), flat) < ALPHA


def test_gumbel_noise_is_the_gumbel_quantile_of_its_hash_out_to_the_far_tail():
    """Each hash maps to the exact Gumbel quantile of its grid point (float64 reference), and the largest
    noise is 22.2: an id 2e-10 as likely as the top one can win (float32 uniforms stop at 16.6, 6e-8)."""
    from vocabtrim.engine.sampling import gumbel_of_hash

    h = torch.tensor([0, -1, 1, 5, -1000, 2**20, 2**24 + 3, 123456789, -987654321, 2**30], dtype=torch.int32)
    w = (h.double().abs() + 0.5) / 2**31
    exact = -torch.log(-torch.log1p(-w))
    assert torch.allclose(gumbel_of_hash(h).double(), exact, rtol=1e-5, atol=1e-6)
    assert float(gumbel_of_hash(h).max()) > 22.1
    # The last few hashes (w within 2**-24 of 1) share the smallest noise, finite.
    ends = gumbel_of_hash(torch.tensor([-(2**31), 2**31 - 1, 2**31 - 2**7], dtype=torch.int32))
    assert torch.isfinite(ends).all() and float(ends.max() - ends.min()) == 0 and float(ends[0]) < -2.8


def test_gumbel_max_with_counter_noise_samples_the_distribution():
    from vocabtrim.engine.sampling import STREAM_GUMBEL, gumbel_argmax, gumbel_noise, noise_keys, seed_words

    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.0, 0.2])
    n = 100_000
    words = seed_words(torch.tensor([row_seed(1, str(i)) for i in range(n)]))
    noise = gumbel_noise(noise_keys(words, torch.full((n, 1), 7), STREAM_GUMBEL), torch.arange(6))[:, 0]
    x = gumbel_argmax(torch.log(p).expand(n, -1), SamplingParams(temperature=1.0), noise)
    counts = torch.bincount(x, minlength=6)
    assert counts[4] == 0
    assert chi_square_pvalue(counts, p) > ALPHA
    wrong = torch.tensor([0.06, 0.39, 0.1, 0.25, 0.0, 0.2])
    assert chi_square_pvalue(counts, wrong) < ALPHA  # power: a 1-point shift is detected
