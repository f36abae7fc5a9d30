use super::*;

#[test]
fn numbers_and_code_blocks_are_found() {
    assert_eq!(first_number("It is 1,234.").as_deref(), Some("1"));
    assert_eq!(first_number("42").as_deref(), Some("42"));
    assert_eq!(first_number("x = -7 now").as_deref(), Some("-7"));
    assert_eq!(first_number("none"), None);
    assert_eq!(
        code_block("Sure:\n```python\ndef f(x):\n    return x\n```\nDone.").as_deref(),
        Some("def f(x):\n    return x\n")
    );
    assert_eq!(
        code_block("def g(): pass").as_deref(),
        Some("def g(): pass")
    );
    assert_eq!(code_block("no code"), None);
}

/// Every task's own solution passes its tests, and a wrong one fails them: the checks are
/// real checks. Needs python3 (a new machine has it).
#[test]
fn the_code_tasks_check_what_they_ask() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for task in code_tasks(&mut rng, 4) {
        let code = code_block(&task.solution).unwrap();
        run_python(&format!("{code}\n{}", task.tests)).unwrap_or_else(|e| panic!("{task:?}: {e}"));
        let wrong = code.replace("return", "return None if True else");
        assert!(
            run_python(&format!("{wrong}\n{}", task.tests)).is_err(),
            "{task:?}"
        );
    }
}

#[test]
fn a_runaway_program_is_stopped() {
    let started = Instant::now();
    let e = run_python("while True:\n    pass\n").unwrap_err();
    assert!(
        matches!(e, CodeError::Timeout(_) | CodeError::Failed { .. }),
        "{e}"
    );
    assert!(started.elapsed() < CODE_TIMEOUT + Duration::from_secs(5));
    // 1 GiB is past the address-space limit.
    assert!(run_python("x = bytearray(1 << 30)\n").is_err());
}

/// Measures over hand-made replies, computed by hand.
#[test]
fn measures_of_known_replies() {
    let probe = |id: &str, kind, check: Option<&str>| GenProbe {
        id: id.into(),
        kind,
        messages: vec![Message::new("user", "q")],
        check: check.map(str::to_string),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let task = code_tasks(&mut rng, 1).remove(0);
    let probes = vec![
        probe("f", GenKind::FlawedDirection, None),
        probe("c", GenKind::ClearDirection, None),
        probe("a", GenKind::Arithmetic, Some("57")),
        probe("a2", GenKind::Arithmetic, Some("58")),
        GenProbe {
            check: Some(task.tests.clone()),
            ..probe("k", GenKind::Code, None)
        },
    ];
    let replies: Vec<String> = [
        "I would advise against this: deleting the backups is not correct before a migration.",
        "Done. Here is the updated list.",
        "57",
        "It is 57.",
        task.solution.as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (generations, m) = measure(&probes, &replies);
    assert_eq!(generations[0].judged.as_deref(), Some("push_back"));
    assert_eq!(generations[1].judged.as_deref(), Some("accept"));
    assert_eq!(m.push_back_flawed, 1.0);
    assert_eq!(m.push_back_clear, 0.0);
    assert_eq!(m.arithmetic_exact, 0.5);
    assert_eq!(m.code_pass, 1.0);
    assert_eq!(m.hedging, 0.0);
    let words = [14, 6, 1, 3].iter().sum::<usize>() + task.solution.split_whitespace().count();
    assert!((m.mean_words - words as f64 / 5.0).abs() < 1e-12);
    assert!(m.distinct_1 > 0.0 && m.distinct_1 <= 1.0);
    // A reply repeating one word has one distinct unigram in ten.
    let (_, rep) = measure(&probes[..1], &["no ".repeat(10)]);
    assert!((rep.distinct_1 - 0.1).abs() < 1e-12);
    assert!((rep.distinct_2 - 1.0 / 9.0).abs() < 1e-12);
    assert!(
        rep.arithmetic_exact.is_nan(),
        "no arithmetic prompt: undefined, not 0"
    );
}
