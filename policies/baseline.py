"""``baseline``: mainline Linux. Callers take any page from the buddy
allocator; CPA splits the direct map wherever the page lands and never
merges it back."""

from guestkernel.policy import Policy, register_policy


@register_policy
class Baseline(Policy):
    name = "baseline"
