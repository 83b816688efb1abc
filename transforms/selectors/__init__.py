"""The selectors: the ranked cut (importance, top, bottom, band, threshold, weighted, all),
cluster-balanced and sensitivity sampling."""
