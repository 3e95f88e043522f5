"""The on-disk contract between the stages of a workdir: resumable logs (`logs`), the names and
readers of each stage's outputs (`layout`), and the one-command-at-a-time lock (`lock`)."""
