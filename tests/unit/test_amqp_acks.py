"""worker/brokers/amqp_transport.py ack_frames, against RabbitMQ's rules for acknowledgements, for
every channel state and batch hypothesis can build: the frames settle exactly the batch's
deliveries, never another's, never a tag RabbitMQ would call unknown (a channel error that hands
every unsettled delivery of the channel back), and a batch with nothing of another's below it
goes in one frame."""

from hypothesis import given
from hypothesis import strategies as st

from worker.brokers.amqp_transport import ack_frames


def settle(outstanding: set[int], frames: list[tuple[int, bool]]) -> set[int]:
    """What RabbitMQ settles for these frames, failing where it would close the channel
    (PRECONDITION_FAILED, unknown delivery tag)."""
    settled: set[int] = set()
    for tag, multiple in frames:
        assert tag in outstanding, f"ack of {tag}, not outstanding: RabbitMQ closes the channel"
        covered = {t for t in outstanding if t <= tag} if multiple else {tag}
        outstanding -= covered
        settled |= covered
    return settled


@st.composite
def channels(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Unsettled delivery tags in order (gaps: deliveries already settled, or a no-ack consumer's) and a
    batch: any non-empty subset of them, in any order."""
    tags = sorted(draw(st.sets(st.integers(min_value=1, max_value=400), min_size=1, max_size=60)))
    batch = draw(st.lists(st.sampled_from(tags), min_size=1, max_size=len(tags), unique=True))
    return tags, draw(st.permutations(batch))


@given(channels())
def test_the_frames_settle_exactly_the_batch(channel: tuple[list[int], list[int]]) -> None:
    unsettled, batch = channel
    frames = ack_frames(unsettled, batch)
    assert settle(set(unsettled), frames) == set(batch)


@given(channels())
def test_a_batch_with_nothing_of_anothers_below_it_is_one_frame(channel: tuple[list[int], list[int]]) -> None:
    unsettled, batch = channel
    frames = ack_frames(unsettled, batch)
    others = set(unsettled) - set(batch)
    if len(batch) > 1 and all(other > max(batch) for other in others):
        assert frames == [(max(batch), True)]
    # Never more frames than messages, and a multiple acknowledgement only where it saves one.
    assert len(frames) <= len(batch)
    assert sum(multiple for _, multiple in frames) <= 1


def test_another_delivery_below_the_batch_splits_it() -> None:
    # 5 is someone else's: 3 and 4 go in one frame, 6 and 7 one each.
    assert ack_frames([3, 4, 5, 6, 7], [7, 3, 6, 4]) == [(4, True), (6, False), (7, False)]
    # The batch's first delivery is above another's: one frame each.
    assert ack_frames([1, 2, 3], [2, 3]) == [(2, False), (3, False)]
    assert ack_frames([9], [9]) == [(9, False)]
