"""Training: grouped settings (:mod:`.args`), one decision of every ``auto`` (:mod:`.plan`), the one setup sequence
(:mod:`.build`), the step (:mod:`.step`), the LightningModule (:mod:`.module`), what a resume may change
(:mod:`.resume`) and the callbacks (:mod:`.callbacks`)."""
