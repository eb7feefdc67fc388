"""The per-token table of arXiv 2402.13388: its layout (`layout`, no torch), how its rows are
built (`build`), stored (`codec`) and looked up by both engines (`lookup`)."""
