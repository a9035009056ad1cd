"""fairseq models of fwp_fairseq (imported by fairseq_plugin when fairseq loads --user-dir)."""
