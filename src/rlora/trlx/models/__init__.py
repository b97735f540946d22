"""trlx's `trlx.models`: `modeling_ppo` (its `PPOConfig` is rlora's) and `modeling_ilql` (refused)."""
