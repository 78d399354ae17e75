"""Iterative curation (DESIGN §9): the data steps (`steps`: flip, filter, vote) and the resumable
loop (`loop.run_curation`) over its inputs (`inputs`), a re-annotation judge (`judges`), scoring
(`scoring`), training (`training`) and the report (`report`); settings in `config`."""
