"""Assessment suites, declared as data where possible: `baseline` (the project's fixed probes,
zero-shot), `fewshot-reference` (the same probes with in-context exemplars, URIAL-style) and
`ifeval` (the 541 IFEval prompts). See core/suites/runner.py."""
