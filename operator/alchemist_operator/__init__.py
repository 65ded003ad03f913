"""The operator: reconciles ContinualLearningJob resources into pods and drives version rollout."""
