from trace_realign.core.triage import TriageType, triage, triage_counts, triage_pair


def test_triage_table_of_the_paper():
    assert triage_pair(False, True) is TriageType.INVERT
    assert triage_pair(False, False) is TriageType.PUNISH
    assert triage_pair(True, True) is TriageType.RETAIN
    assert triage_pair(True, False) is TriageType.RETAIN


def test_unknown_verdicts():
    assert triage_pair(None, True) is TriageType.UNKNOWN
    assert triage_pair(False, None) is TriageType.UNKNOWN
    # A compliant old winner is RETAIN whatever the loser's verdict.
    assert triage_pair(True, None) is TriageType.RETAIN


def test_counts():
    types = triage([False, False, True, None], [True, False, None, True])
    assert types == [TriageType.INVERT, TriageType.PUNISH, TriageType.RETAIN, TriageType.UNKNOWN]
    assert triage_counts(types) == {"invert": 1, "punish": 1, "retain": 1, "unknown": 1, "total": 4}


def test_relabelled_swaps_invert_keeps_the_rest_and_has_nothing_for_unknown():
    from trace_realign.core.data import PreferencePair
    from trace_realign.core.triage import TriagedPair, TriageType, relabelled

    pair = PreferencePair.create("q", "w", "l")
    assert relabelled(TriagedPair(pair, TriageType.INVERT, False, True)) == ("l", "w")
    assert relabelled(TriagedPair(pair, TriageType.PUNISH, False, False)) == ("w", "l")
    assert relabelled(TriagedPair(pair, TriageType.RETAIN, True, True)) == ("w", "l")
    assert relabelled(TriagedPair(pair, TriageType.UNKNOWN, None, True)) is None
