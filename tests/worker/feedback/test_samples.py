import redis
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.schemas import RequestRecord
from alchemist_worker.feedback.consumer import ConsumerSettings, FeedbackConsumer
from alchemist_worker.feedback.samples import SampleResolver, Skip, SkipKind, TrainingSample

KEYS = JobKeys("ns", "job")
EOS = 2


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def setup(redis_client: redis.Redis) -> tuple[FeedbackClient, FeedbackConsumer, SampleResolver]:
    store = JobStore(redis_client, KEYS)
    store.put_request(
        RequestRecord(
            request_id="done",
            prompt_tokens=[5, 6],
            response_tokens=[7, 8, EOS],
            replica="r1",
            version=2,
            model="m",
        ),
        ttl_seconds=60,
    )
    store.put_request(
        RequestRecord(
            request_id="cut", prompt_tokens=[5], response_tokens=[7, 8], replica="r0", version=0, model="m"
        ),
        ttl_seconds=60,
    )
    consumer = FeedbackConsumer(redis_client, KEYS, ConsumerSettings("r0"))
    consumer.ensure_group()
    return (
        FeedbackClient(redis_client, KEYS),
        consumer,
        SampleResolver(store, encode, {EOS}, max_tokens=16, end_token=EOS),
    )


def test_accepted_corrected_rejected_and_unknown(redis_client: redis.Redis) -> None:
    client, consumer, resolver = setup(redis_client)
    client.accept("done")
    client.correct("done", "ab")
    client.correct("cut", "xy")
    client.reject("done")
    client.accept("nobody-served-this")
    client.correct("done", "z" * 20)
    out = [resolver.resolve(item) for item in consumer.poll()]
    accepted, corrected, corrected_cut, rejected, unknown, too_long = out
    assert isinstance(accepted, TrainingSample)
    assert accepted.prompt_tokens == (5, 6) and accepted.response_tokens == (7, 8, EOS)
    assert accepted.served_version == 2 and accepted.served_by == "r1" and not accepted.corrected
    assert (
        isinstance(corrected, TrainingSample)
        and corrected.response_tokens == (97, 98, EOS)
        and corrected.corrected
    )
    assert isinstance(corrected_cut, TrainingSample) and corrected_cut.response_tokens == (120, 121, EOS)
    assert rejected == Skip(SkipKind.NOT_TRAINED, "rejected answers are not imitated", 2)
    assert (
        isinstance(unknown, Skip) and unknown.kind is SkipKind.DEAD and "no request record" in unknown.reason
    )
    assert (
        isinstance(too_long, Skip)
        and too_long.kind is SkipKind.DEAD
        and "more than the 16" in too_long.reason
    )


def test_rejections_become_undesirable_samples_when_the_objective_uses_them(
    redis_client: redis.Redis,
) -> None:
    client, consumer, plain = setup(redis_client)
    resolver = SampleResolver(plain.store, encode, {EOS}, max_tokens=16, end_token=EOS, train_rejections=True)
    client.reject("done")
    client.correct("done", "ab")
    client.accept("done")
    client.correct("done", "abcdefghij")  # 13 tokens; with the replaced answer over the prompt 18 > 16
    rejected, corrected, accepted, long_correction = [resolver.resolve(item) for item in consumer.poll()]
    assert isinstance(rejected, TrainingSample) and not rejected.desirable
    assert rejected.response_tokens == (7, 8, EOS) and rejected.replaced_tokens == ()
    assert isinstance(corrected, TrainingSample) and corrected.desirable
    assert corrected.response_tokens == (97, 98, EOS) and corrected.replaced_tokens == (7, 8, EOS)
    assert corrected.num_tokens == 2 + 3 + 2 + 3
    assert isinstance(accepted, TrainingSample) and accepted.desirable and accepted.replaced_tokens == ()
    assert isinstance(long_correction, TrainingSample) and long_correction.replaced_tokens == ()
