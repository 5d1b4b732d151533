"""Parts of the error-analysis stage (``pipeline.analyze``): scores per class, confusions,
calibration, label issues (cleanlab), contact sheets, adversarial validation and the report."""
