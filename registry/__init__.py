"""The two explicit lists the framework is configured by: the stages and the model profiles."""
