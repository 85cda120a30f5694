use super::*;

fn sched(num_blocks: usize, max_tokens: usize, max_seqs: usize) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        max_num_seqs: max_seqs,
        max_batched_tokens: max_tokens,
        max_prefill_tokens: max_tokens,
        num_blocks,
        block_size: 4,
    })
}

/// Up to 8 sequences and 64 tokens a step, of which at most `max_prefill` prompt tokens beside
/// decoding streams.
fn prompt_capped_sched(max_prefill: usize) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        max_num_seqs: 8,
        max_batched_tokens: 64,
        max_prefill_tokens: max_prefill,
        num_blocks: 64,
        block_size: 4,
    })
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| i * 7 + salt).collect()
}

/// Runs a step as the engine would: advance, then give every sampling request a token.
fn step(s: &mut Scheduler) -> SchedulerOutput {
    let out = s.schedule();
    s.advance(&out);
    for seq in &out.seqs {
        if seq.samples {
            s.append(seq.id, 1000);
        }
    }
    s.check_invariants();
    out
}

#[test]
fn long_prompt_is_chunked_under_the_token_budget() {
    let mut s = sched(64, 8, 4);
    s.add(SchedRequest::new(
        RequestId(1),
        prompt(20, 0),
        Priority::Interactive,
    ));
    let chunks: Vec<(usize, bool)> = (0..3)
        .map(|_| {
            let out = step(&mut s);
            (out.seqs[0].num_new, out.seqs[0].samples)
        })
        .collect();
    assert_eq!(chunks, vec![(8, false), (8, false), (4, true)]);
    let out = step(&mut s);
    assert_eq!(
        (out.seqs[0].num_computed, out.seqs[0].num_new),
        (20, 1),
        "then one decode token per step"
    );
}

#[test]
fn budget_and_sequence_limit_hold_every_step() {
    let mut s = sched(256, 16, 3);
    for i in 0..6 {
        s.add(SchedRequest::new(
            RequestId(i),
            prompt(10, i as u32),
            Priority::Interactive,
        ));
    }
    for _ in 0..30 {
        let out = step(&mut s);
        assert!(out.num_tokens() <= 16);
        assert!(out.seqs.len() <= 3);
        assert!(s.num_running() <= 3);
    }
}

#[test]
fn prompt_tokens_per_step_are_capped_while_every_decode_runs() {
    let mut s = prompt_capped_sched(6);
    // Three streams decoding, then three prompts of 10 arriving at once.
    for i in 0..3 {
        s.add(SchedRequest::new(
            RequestId(i),
            prompt(4, i as u32),
            Priority::Interactive,
        ));
        step(&mut s);
    }
    for i in 3..6 {
        s.add(SchedRequest::new(
            RequestId(i),
            prompt(10, i as u32),
            Priority::Interactive,
        ));
    }
    let mut first_tokens = Vec::new();
    for n in 0..12 {
        let out = step(&mut s);
        let prompts: Vec<_> = out
            .seqs
            .iter()
            .filter(|q| q.id.0 >= 3 && q.num_computed < 10)
            .collect();
        let prefill: usize = prompts.iter().map(|q| q.num_new).sum();
        assert!(prefill <= 6, "step {n}: {prefill} prompt tokens");
        for i in 0..3 {
            assert!(
                out.seqs
                    .iter()
                    .any(|q| q.id == RequestId(i) && q.num_new == 1),
                "step {n}: stream {i} decodes every step"
            );
        }
        first_tokens.extend(prompts.iter().filter(|q| q.samples).map(|q| q.id));
    }
    // 30 prompt tokens at 6 a step: all three prompts done within the twelve steps, in order.
    assert_eq!(first_tokens, vec![RequestId(3), RequestId(4), RequestId(5)]);
}

#[test]
fn prompts_take_the_whole_step_when_nothing_decodes() {
    let mut s = prompt_capped_sched(6);
    for i in 0..2 {
        s.add(SchedRequest::new(
            RequestId(i),
            prompt(40, i as u32),
            Priority::Interactive,
        ));
    }
    // Nothing decodes: the first prompt whole and 24 tokens of the second, the step's budget.
    let out = step(&mut s);
    let chunks: Vec<_> = out.seqs.iter().map(|q| (q.id, q.num_new)).collect();
    assert_eq!(chunks, vec![(RequestId(0), 40), (RequestId(1), 24)]);
    // Now the first decodes beside the second's prompt: the cap is back.
    let out = step(&mut s);
    let chunks: Vec<_> = out.seqs.iter().map(|q| (q.id, q.num_new)).collect();
    assert_eq!(chunks, vec![(RequestId(0), 1), (RequestId(1), 6)]);
}

#[test]
fn decodes_and_prefill_share_a_step() {
    let mut s = sched(64, 32, 8);
    s.add(SchedRequest::new(
        RequestId(1),
        prompt(6, 0),
        Priority::Interactive,
    ));
    step(&mut s);
    s.add(SchedRequest::new(
        RequestId(2),
        prompt(9, 1),
        Priority::Interactive,
    ));
    let out = step(&mut s);
    assert_eq!(out.seqs.len(), 2);
    assert_eq!((out.seqs[0].id, out.seqs[0].num_new), (RequestId(1), 1));
    assert_eq!((out.seqs[1].id, out.seqs[1].num_new), (RequestId(2), 9));
}

#[test]
fn shared_prefix_is_not_recomputed() {
    let mut s = sched(64, 64, 8);
    let system = prompt(16, 3);
    s.add(SchedRequest::new(
        RequestId(1),
        system.clone(),
        Priority::Interactive,
    ));
    step(&mut s);
    let mut second = system.clone();
    second.extend([5, 6, 7]);
    s.add(SchedRequest::new(
        RequestId(2),
        second,
        Priority::Interactive,
    ));
    let out = step(&mut s);
    let seq = out.seqs.iter().find(|q| q.id == RequestId(2)).unwrap();
    assert_eq!((seq.num_computed, seq.num_new), (16, 3));
    assert_eq!(s.kv().prefix_hit_tokens, 16);
}

#[test]
fn a_full_prompt_is_computed_whole_despite_the_prefix_cache() {
    let mut s = sched(64, 64, 8);
    let system = prompt(16, 3);
    s.add(SchedRequest::new(
        RequestId(1),
        system.clone(),
        Priority::Interactive,
    ));
    step(&mut s);
    let mut scored = system.clone();
    scored.extend([5, 6, 7]);
    let mut req = SchedRequest::new(RequestId(2), scored, Priority::Interactive);
    req.full_prompt = true;
    s.add(req);
    let out = step(&mut s);
    let seq = out.seqs.iter().find(|q| q.id == RequestId(2)).unwrap();
    assert_eq!((seq.num_computed, seq.num_new), (0, 19));
    assert_eq!(s.request(RequestId(2)).unwrap().num_cached, 0);
}

#[test]
fn a_full_prompt_is_computed_a_capped_chunk_a_step() {
    let mut s = sched(1024, 4096, 8);
    let mut req = SchedRequest::new(RequestId(1), prompt(1200, 0), Priority::Interactive);
    req.full_prompt = true;
    s.add(req);
    s.add(SchedRequest::new(
        RequestId(2),
        prompt(700, 1),
        Priority::Interactive,
    ));
    let chunks: Vec<Vec<(usize, usize)>> = (0..3)
        .map(|_| {
            step(&mut s)
                .seqs
                .iter()
                .map(|q| (q.id.0 as usize, q.num_new))
                .collect()
        })
        .collect();
    // The other prompt is not held back by the cap.
    assert_eq!(chunks[0], [(1, FULL_PROMPT_TOKENS_PER_STEP), (2, 700)]);
    assert_eq!(chunks[1][0], (1, FULL_PROMPT_TOKENS_PER_STEP));
    assert_eq!(chunks[2][0], (1, 1200 - 2 * FULL_PROMPT_TOKENS_PER_STEP));
}

#[test]
fn running_out_of_blocks_preempts_the_newest_and_frees_its_blocks() {
    // 6 blocks of 4 = 24 slots; two requests of 8 prompt tokens each grow until they collide.
    let mut s = sched(6, 64, 8);
    s.add(SchedRequest::new(
        RequestId(1),
        prompt(8, 0),
        Priority::Interactive,
    ));
    s.add(SchedRequest::new(
        RequestId(2),
        prompt(8, 1),
        Priority::Interactive,
    ));
    let mut preempted = Vec::new();
    for _ in 0..12 {
        let out = step(&mut s);
        preempted.extend(out.preempted);
    }
    assert_eq!(
        preempted.first(),
        Some(&RequestId(2)),
        "the newer request yields"
    );
    let r1 = s.request(RequestId(1)).unwrap();
    assert!(r1.num_generated() >= 12, "the older request kept going");
    // Once the first finishes, the second is recomputed from its prompt + output.
    s.remove(RequestId(1));
    let out = step(&mut s);
    let seq = &out.seqs[0];
    assert_eq!(seq.id, RequestId(2));
    assert_eq!(
        seq.num_computed + seq.num_new,
        s.request(RequestId(2)).unwrap().tokens.len() - 1
    );
}

#[test]
fn batch_priority_is_admitted_after_interactive_and_preempted_first() {
    let mut s = sched(64, 64, 1);
    s.add(SchedRequest::new(
        RequestId(1),
        prompt(4, 0),
        Priority::Batch,
    ));
    s.add(SchedRequest::new(
        RequestId(2),
        prompt(4, 1),
        Priority::Interactive,
    ));
    let out = step(&mut s);
    assert_eq!(out.seqs[0].id, RequestId(2));

    let mut s = sched(4, 64, 8);
    s.add(SchedRequest::new(
        RequestId(1),
        prompt(4, 0),
        Priority::Batch,
    ));
    step(&mut s);
    s.add(SchedRequest::new(
        RequestId(2),
        prompt(4, 1),
        Priority::Interactive,
    ));
    let mut preempted = Vec::new();
    for _ in 0..6 {
        preempted.extend(step(&mut s).preempted);
    }
    assert_eq!(preempted.first(), Some(&RequestId(1)));
}

#[test]
fn removing_a_request_frees_its_blocks_at_once() {
    let mut s = sched(16, 64, 8);
    s.add(SchedRequest::new(
        RequestId(1),
        prompt(12, 0),
        Priority::Interactive,
    ));
    step(&mut s);
    assert!(s.kv().num_free_blocks() < 16);
    s.remove(RequestId(1));
    s.check_invariants();
    assert_eq!(s.kv().num_free_blocks(), 16);
    assert!(!s.has_work());
}

#[test]
fn an_interactive_request_takes_the_slot_of_the_newest_batch_request() {
    // Two sequences at most, both batch work: an interactive arrival runs in the next step, in
    // the place of the newer batch request, which then waits first among the batch work.
    let mut s = sched(64, 64, 2);
    for id in 1..=3 {
        s.add(SchedRequest::new(
            RequestId(id),
            prompt(4, id as u32),
            Priority::Batch,
        ));
    }
    step(&mut s);
    s.add(SchedRequest::new(
        RequestId(9),
        prompt(4, 9),
        Priority::Interactive,
    ));
    let out = step(&mut s);
    assert_eq!(out.preempted, [RequestId(2)]);
    let ids: Vec<RequestId> = out.seqs.iter().map(|q| q.id).collect();
    assert_eq!(ids, [RequestId(1), RequestId(9)]);
    assert_eq!(
        s.waiting.iter().copied().collect::<Vec<_>>(),
        [RequestId(2), RequestId(3)]
    );

    // Interactive requests do not preempt one another for a slot.
    let mut s = sched(64, 64, 1);
    s.add(SchedRequest::new(
        RequestId(1),
        prompt(4, 1),
        Priority::Interactive,
    ));
    step(&mut s);
    s.add(SchedRequest::new(
        RequestId(2),
        prompt(4, 2),
        Priority::Interactive,
    ));
    let out = step(&mut s);
    assert!(out.preempted.is_empty());
    assert_eq!(out.seqs.len(), 1);
}

#[test]
fn an_interactive_request_takes_the_blocks_of_batch_requests() {
    // Eight blocks of 4 tokens, held by two batch requests of 16 tokens; an interactive prompt
    // of 8 tokens needs two: the newest batch request gives them up in the same step.
    let mut s = sched(8, 64, 8);
    for id in 1..=2 {
        s.add(SchedRequest::new(
            RequestId(id),
            prompt(15, id as u32),
            Priority::Batch,
        ));
    }
    step(&mut s);
    assert_eq!(s.kv().num_free_blocks(), 0);
    s.add(SchedRequest::new(
        RequestId(9),
        prompt(8, 9),
        Priority::Interactive,
    ));
    let out = step(&mut s);
    assert_eq!(out.preempted, [RequestId(2)]);
    assert!(out
        .seqs
        .iter()
        .any(|q| q.id == RequestId(9) && q.num_new == 8));
}

#[test]
fn a_victim_scheduled_earlier_in_the_step_leaves_it() {
    // Two blocks of 4 tokens. The older request is batch work whose next token fits its block,
    // so it is scheduled first; the newer interactive one then needs a second block: the batch
    // request gives its block up and leaves the step (its tokens back in the budget) rather
    // than running on freed blocks.
    let mut s = sched(2, 64, 8);
    s.add(SchedRequest::new(
        RequestId(1),
        prompt(2, 1),
        Priority::Batch,
    ));
    step(&mut s);
    s.add(SchedRequest::new(
        RequestId(2),
        prompt(4, 2),
        Priority::Interactive,
    ));
    step(&mut s);
    assert_eq!(s.kv().num_free_blocks(), 0);
    let out = step(&mut s);
    assert_eq!(out.preempted, [RequestId(1)]);
    let ids: Vec<RequestId> = out.seqs.iter().map(|q| q.id).collect();
    assert_eq!(ids, [RequestId(2)]);
}
