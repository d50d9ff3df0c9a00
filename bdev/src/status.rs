//! The one mapping between NVMe completion statuses and bdev outcomes, used
//! by every part that speaks NVMe: the target (outcome → status), and the
//! initiator and the VFIO driver (status → outcome).

use unvme_proto::nvme::{sct, Status};

use crate::IoError;

/// The bdev outcome of an NVMe completion status.
pub fn from_nvme(s: Status) -> Result<(), IoError> {
    if s.is_success() {
        return Ok(());
    }
    Err(match (s.sct, s.sc) {
        (sct::GENERIC, 0x80) | (sct::GENERIC, 0x81) => IoError::OutOfRange,
        (sct::MEDIA, 0x85) => IoError::CompareFailure,
        (sct::GENERIC, 0x01) => IoError::Unsupported,
        (sct::GENERIC, 0x0B) | (sct::GENERIC, 0x82) | (sct::PATH, _) => IoError::Unavailable,
        _ => IoError::Media(s.to_string()),
    })
}

/// The NVMe completion status a target answers for a bdev failure.
pub fn to_nvme(e: &IoError) -> Status {
    match e {
        IoError::OutOfRange => Status::LBA_OUT_OF_RANGE,
        IoError::BadBuffer => Status::DATA_SGL_LENGTH_INVALID,
        IoError::TooLarge => Status::INVALID_FIELD,
        IoError::CompareFailure => Status::COMPARE_FAILURE,
        IoError::Unsupported => Status::INVALID_OPCODE,
        IoError::Media(_) => Status::INTERNAL,
        IoError::Timeout | IoError::Unavailable => Status::NS_NOT_READY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(from_nvme(Status::SUCCESS), Ok(()));
        assert_eq!(
            from_nvme(Status::LBA_OUT_OF_RANGE),
            Err(IoError::OutOfRange)
        );
        assert_eq!(
            from_nvme(Status::CAPACITY_EXCEEDED),
            Err(IoError::OutOfRange)
        );
        assert_eq!(
            from_nvme(Status::COMPARE_FAILURE),
            Err(IoError::CompareFailure)
        );
        assert_eq!(from_nvme(Status::INVALID_OPCODE), Err(IoError::Unsupported));
        assert_eq!(from_nvme(Status::NS_NOT_READY), Err(IoError::Unavailable));
        assert!(
            matches!(from_nvme(Status::WRITE_FAULT), Err(IoError::Media(m)) if m.contains("Write Fault"))
        );
    }

    #[test]
    fn outcomes_survive_a_round_trip_through_the_wire_status() {
        for e in [
            IoError::OutOfRange,
            IoError::CompareFailure,
            IoError::Unsupported,
            IoError::Unavailable,
        ] {
            assert_eq!(from_nvme(to_nvme(&e)), Err(e.clone()), "{e:?}");
        }
        assert!(matches!(
            from_nvme(to_nvme(&IoError::Media("x".into()))),
            Err(IoError::Media(_))
        ));
    }
}
