//! A VM as the CLI addresses it: its path in the daemon's API, and command
//! words as the guest's shell (over ssh or the agent) reads them back.

/// The API path of VM `name`.
pub(crate) fn vm_path(name: &str) -> String {
    // Names are validated (a-z, 0-9, '-') so they need no escaping.
    format!("/v1/vms/{name}")
}

/// The command words as ssh should send them. ssh joins its arguments with
/// spaces for the remote shell, which would split `sh -c 'a; b'` apart: one
/// word is a shell command line and goes as is; several words are an argv
/// and each is quoted so the guest runs exactly those words.
pub(crate) fn remote_command(command: &[String]) -> Vec<String> {
    match command {
        [line] => vec![line.clone()],
        words => words.iter().map(|w| shell_quote(w)).collect(),
    }
}

/// `word` as a POSIX shell reads it back: bare when it is made of safe
/// characters, single-quoted otherwise.
pub(crate) fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}
