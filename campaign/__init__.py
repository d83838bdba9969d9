"""Fault campaigns, in three wings that follow the data flow: ``campaign.faults`` (torch only),
orchestration at this level (spec, plan, actors, store) and ``campaign.analysis`` (no torch, no
Ray). docs/design.md opens with the map."""
