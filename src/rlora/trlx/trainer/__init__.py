"""trlx's `trlx.trainer` modules that trlx's examples import from; rlora has one trainer
(`rlora.trainer.Trainer`), so each of these only holds names that refuse with the reason."""
